#![no_main]
//! libFuzzer entry for the pull-grant verifier; body in `targets/grant.rs`.

#[path = "../targets/grant.rs"]
mod grant;

libfuzzer_sys::fuzz_target!(|data: &[u8]| grant::grant_verify(data));
