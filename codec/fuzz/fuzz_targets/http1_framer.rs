//! The framer must never panic, and what it delivers must not depend on how the bytes were split
//! into reads (a split-dependent verdict would be a smuggling hole of its own).
#![no_main]

use libfuzzer_sys::fuzz_target;
use membrane_codec::http1::{Framer, Limits, Upgrades};

fn run(data: &[u8], split: usize) -> (Vec<u8>, Option<(u64, u16)>, bool) {
    let limits = Limits {
        max_head_bytes: 512,
        max_headers: 16,
        max_uri_bytes: 128,
    };
    let mut f = Framer::new(limits, Upgrades::default());
    let mut out = Vec::new();
    for piece in data.chunks(split.max(1)) {
        f.feed(piece, &mut out);
        if f.failed().is_some() {
            break;
        }
    }
    (
        out,
        f.refused().map(|(i, r)| (*i, r.status)),
        f.failed().is_some(),
    )
}

fuzz_target!(|input: &[u8]| {
    let Some((&split, data)) = input.split_first() else {
        return;
    };
    let whole = run(data, data.len());
    let pieces = run(data, usize::from(split % 17) + 1);
    // A failure stops feeding, so only compare what was delivered before it.
    if !whole.2 && !pieces.2 {
        assert_eq!(whole, pieces);
    }
    assert_eq!(whole.2, pieces.2, "framing failure depends on the read split");
});
