//! The label index: label key → value → identities holding that label (any source), to find a
//! new selector's candidates without checking every identity.
//!
//! Laid out for what dominates it: CIDR identities carry a label per enclosing prefix (31 for a
//! /29), so most keys have one value and few identities. Sorted vectors instead of nested hash
//! maps and B-trees keep that at tens of bytes per label rather than hundreds.

use std::collections::HashMap;

use crate::identity::NumericIdentity;

#[derive(Clone, Debug, Default)]
pub(super) struct LabelIndex {
    /// Per key: (value, identities), both sorted.
    by_key: HashMap<String, Vec<(String, Vec<NumericIdentity>)>>,
}

impl LabelIndex {
    pub(super) fn insert(&mut self, key: &str, value: &str, id: NumericIdentity) {
        let values = match self.by_key.get_mut(key) {
            Some(values) => values,
            None => self.by_key.entry(key.to_string()).or_default(),
        };
        match values.binary_search_by(|(v, _)| v.as_str().cmp(value)) {
            Ok(at) => {
                let ids = &mut values[at].1;
                if let Err(i) = ids.binary_search(&id) {
                    ids.insert(i, id);
                }
            }
            Err(at) => values.insert(at, (value.to_string(), vec![id])),
        }
    }

    pub(super) fn remove(&mut self, key: &str, value: &str, id: NumericIdentity) {
        let Some(values) = self.by_key.get_mut(key) else {
            return;
        };
        if let Ok(at) = values.binary_search_by(|(v, _)| v.as_str().cmp(value)) {
            let ids = &mut values[at].1;
            if let Ok(i) = ids.binary_search(&id) {
                ids.remove(i);
            }
            if ids.is_empty() {
                values.remove(at);
            }
        }
        if values.is_empty() {
            self.by_key.remove(key);
        }
    }

    /// The identities with `key=value`.
    pub(super) fn get(&self, key: &str, value: &str) -> &[NumericIdentity] {
        self.by_key
            .get(key)
            .and_then(|values| {
                let at = values
                    .binary_search_by(|(v, _)| v.as_str().cmp(value))
                    .ok()?;
                Some(values[at].1.as_slice())
            })
            .unwrap_or_default()
    }

    /// The identities with `key`, one list per value.
    pub(super) fn with_key(&self, key: &str) -> impl Iterator<Item = &[NumericIdentity]> {
        self.by_key
            .get(key)
            .into_iter()
            .flatten()
            .map(|(_, ids)| ids.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_remove_and_lookups_stay_sorted_and_drop_empty_entries() {
        let mut ix = LabelIndex::default();
        let n = NumericIdentity;
        ix.insert("app", "web", n(300));
        ix.insert("app", "web", n(256));
        ix.insert("app", "web", n(256));
        ix.insert("app", "db", n(257));
        ix.insert("10.0.0.0/8", "", n(1 << 24 | 1));
        assert_eq!(ix.get("app", "web"), [n(256), n(300)]);
        assert_eq!(ix.get("app", "nope"), []);
        assert_eq!(
            ix.with_key("app").collect::<Vec<_>>(),
            [&[n(257)][..], &[n(256), n(300)]]
        );
        ix.remove("app", "web", n(256));
        ix.remove("app", "web", n(300));
        ix.remove("app", "web", n(999));
        assert_eq!(ix.with_key("app").count(), 1);
        ix.remove("app", "db", n(257));
        ix.remove("10.0.0.0/8", "", n(1 << 24 | 1));
        assert!(ix.by_key.is_empty());
    }
}
