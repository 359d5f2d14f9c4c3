#![no_main]
//! libFuzzer entry for the AdmissionReview decoder; body in `targets/webhook.rs`.

#[path = "../targets/webhook.rs"]
mod webhook;

libfuzzer_sys::fuzz_target!(|data: &[u8]| webhook::admission_review(data));
