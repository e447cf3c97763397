
mod controller;
mod bench;
