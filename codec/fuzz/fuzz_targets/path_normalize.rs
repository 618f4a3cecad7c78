//! Normalization never panics, is idempotent, and leaves no dot segment or double slash; the
//! lenient reading of its result leaves no separator-like byte, segment parameter or dot segment.
#![no_main]

use libfuzzer_sys::fuzz_target;
use membrane_codec::path::{lenient_reading, normalize_target};

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
    if let Some(read) = lenient_reading(&once) {
        let path = read.split('?').next().unwrap();
        assert!(path.starts_with('/') && !path.contains("//"), "{path}");
        assert!(!path.contains(['\\', ';']), "{path}");
        let lower = path.to_ascii_lowercase();
        assert!(!lower.contains("%2f") && !lower.contains("%5c"), "{path}");
        assert!(path.split('/').all(|seg| seg != "." && seg != ".."), "{path}");
        assert_eq!(lenient_reading(&read), None, "{read}");
    }
});
