//! Manifest parsing and validation on arbitrary bytes: never a panic, and whatever parses
//! serialises to JSON that parses back to the same manifest.

#![no_main]

use hyperfarm_shared::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::parse(data) {
        let _ = m.check();
        let _ = m.vm_name().map(hyperfarm_shared::names::check_vm_name);
        let again = Manifest::parse(&m.to_json()).expect("our own serialisation parses");
        assert_eq!(again, m, "a manifest survives a round trip");
    }
    // The other text parsers that read what other programs wrote.
    let text = String::from_utf8_lossy(data);
    let _ = hyperfarm_shared::vmdk::parse(&text);
    let _ = hyperfarm_shared::names::sanitize_vm_name(&text);
});
