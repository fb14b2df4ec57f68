#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| barnraise_fuzz::targets::dataset_manifest(data));
