#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| barnraise_fuzz::targets::blob_journal(data));
