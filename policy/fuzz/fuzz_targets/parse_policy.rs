//! Any bytes given to the policy parser (and the endpoints parser) produce a policy or
//! diagnostics with positions, never a panic, a hang or unbounded memory.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match membrane_policy::PolicySet::from_sources([("fuzz.yaml", text)]) {
        Ok(set) => {
            // Whatever parses must also resolve.
            let mut r = membrane_policy::resolve::Resolver::new(Default::default());
            r.set_rules(&set.rules);
        }
        Err(diags) => assert!(!diags.is_empty()),
    }
    let _ = membrane_policy::endpoints::parse_endpoints("fuzz.yaml", text);
});
