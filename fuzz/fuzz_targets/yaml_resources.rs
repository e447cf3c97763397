//! The YAML resource parser behind `quicmesh ctl apply -f`: `parse_yaml_documents`, then
//! `Resource::validate` on each document, as `ctl` runs them before anything reaches the controller.
//! Input: the text of a file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quicmesh_controller::model::{self, Resource};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(resources) = model::parse_yaml_documents(text) else {
        return;
    };
    for r in &resources {
        if r.validate("mesh.local").is_err() {
            continue;
        }
        let _ = r.key();
        // `ctl get -o yaml` output re-applies: a valid resource survives a YAML round trip.
        let yaml = serde_yaml_ng::to_string(r).expect("a valid resource serializes");
        let again = model::parse_yaml_documents(&yaml).expect("serialized resource parses");
        assert_eq!(again.as_slice(), std::slice::from_ref::<Resource>(r));
    }
});
