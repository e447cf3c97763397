
mod controller;
