//! Normalization never panics, is idempotent, and leaves no dot segment or double slash.
#![no_main]

use libfuzzer_sys::fuzz_target;
use membrane_codec::path::normalize_target;

fuzz_target!(|input: &[u8]| {
    let Ok(s) = std::str::from_utf8(input) else {
        return;
    };
    let Ok(once) = normalize_target(s) else {
        return;
    };
    let once = once.into_owned();
    assert_eq!(normalize_target(&once).unwrap(), once.as_str());
    if once != "*" {
        let path = once.split('?').next().unwrap();
        assert!(path.starts_with('/'));
        assert!(!path.contains("//"), "{path}");
        assert!(path.split('/').all(|seg| seg != "." && seg != ".."), "{path}");
    }
});
