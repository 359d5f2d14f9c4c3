#![no_main]
//! libFuzzer entry for `reference`; the body and its property live in `targets/oci.rs`.

#[path = "../targets/oci.rs"]
#[allow(dead_code)]
mod oci;

libfuzzer_sys::fuzz_target!(|data: &[u8]| oci::reference(data));
