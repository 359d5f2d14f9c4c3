#![no_main]
//! libFuzzer entry for `http_head`; the body and its property live in `targets/oci.rs`.

#[path = "../targets/oci.rs"]
#[allow(dead_code)]
mod oci;

libfuzzer_sys::fuzz_target!(|data: &[u8]| oci::http_head(data));
