//! Label selectors (Kubernetes `LabelSelector` semantics with Cilium's label sources).

use std::fmt;

use serde::Serialize;

use crate::labels::{LabelSet, Source};

/// The label key of a pod's namespace.
pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// The prefix under which namespace labels are copied into an endpoint's labels.
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
/// The label key of a pod's service account.
pub const SERVICE_ACCOUNT_LABEL: &str = "io.cilium.k8s.policy.serviceaccount";

/// The operator of one requirement.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Operator {
    /// The label exists with one of these values.
    In(Vec<String>),
    /// No label with this key has one of these values (an absent label satisfies it).
    NotIn(Vec<String>),
    /// The label exists.
    Exists,
    /// The label does not exist.
    DoesNotExist,
}

/// One requirement on one key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Requirement {
    /// Source of the key (`Any` matches every source).
    pub source: Source,
    /// The key.
    pub key: String,
    /// The operator and its values.
    pub op: Operator,
}

impl Requirement {
    /// `source:key=value`.
    pub fn equals(source: Source, key: impl Into<String>, value: impl Into<String>) -> Self {
        Requirement {
            source,
            key: key.into(),
            op: Operator::In(vec![value.into()]),
        }
    }

    /// Whether `labels` satisfies this requirement.
    pub fn matches(&self, labels: &LabelSet) -> bool {
        let mut with_key = labels.with_key(self.source, &self.key);
        match &self.op {
            Operator::In(values) => with_key.any(|l| values.iter().any(|v| *v == *l.value)),
            Operator::NotIn(values) => !with_key.any(|l| values.iter().any(|v| *v == *l.value)),
            Operator::Exists => with_key.next().is_some(),
            Operator::DoesNotExist => with_key.next().is_none(),
        }
    }
}

/// A conjunction of requirements. The empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// The selector that matches every label set.
    pub fn wildcard() -> Selector {
        Selector::default()
    }

    /// A selector from requirements (order does not matter).
    pub fn new(mut requirements: Vec<Requirement>) -> Selector {
        requirements.sort();
        requirements.dedup();
        Selector { requirements }
    }

    /// `reserved:<name>`.
    pub fn reserved(name: &str) -> Selector {
        Selector::new(vec![Requirement {
            source: Source::Reserved,
            key: name.to_string(),
            op: Operator::Exists,
        }])
    }

    /// The requirements, sorted.
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    /// Whether this selector matches every label set.
    pub fn is_wildcard(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Whether `labels` satisfies every requirement.
    pub fn matches(&self, labels: &LabelSet) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// This selector ANDed with `other`.
    pub fn and(&self, other: &Selector) -> Selector {
        let mut r = self.requirements.clone();
        r.extend(other.requirements.iter().cloned());
        Selector::new(r)
    }

    /// Adds a requirement.
    pub fn push(&mut self, requirement: Requirement) {
        self.requirements.push(requirement);
        self.requirements.sort();
        self.requirements.dedup();
    }

    /// Whether any requirement names the pod namespace key (any source).
    pub fn names_namespace(&self) -> bool {
        self.requirements.iter().any(|r| r.key == NAMESPACE_LABEL)
    }

    /// Whether any requirement is on a `reserved:` label.
    pub fn names_reserved(&self) -> bool {
        self.requirements
            .iter()
            .any(|r| r.source == Source::Reserved)
    }

    /// Whether the selector selects `reserved:init` (such selectors are never namespace-scoped).
    pub fn selects_init(&self) -> bool {
        self.requirements.iter().any(|r| {
            r.source == Source::Reserved
                && r.key == "init"
                && !matches!(r.op, Operator::DoesNotExist | Operator::NotIn(_))
        })
    }

    /// Confines the selector to namespace `ns`, as Cilium does for namespaced policies.
    pub fn in_namespace(&self, ns: &str) -> Selector {
        let mut s = self.clone();
        s.push(Requirement::equals(Source::K8s, NAMESPACE_LABEL, ns));
        s
    }

    /// An equality requirement `key=value` that every match must satisfy, if there is one. Used
    /// to index candidate identities instead of scanning all of them.
    /// The namespace is the least selective equality, so another one is preferred.
    pub fn index_hint(&self) -> Option<(&str, &[String])> {
        let mut equalities = self.equalities();
        let first = equalities.next()?;
        Some(if first.0 == NAMESPACE_LABEL {
            equalities.next().unwrap_or(first)
        } else {
            first
        })
    }

    /// Every `key in (values)` requirement.
    pub fn equalities(&self) -> impl Iterator<Item = (&str, &[String])> {
        self.requirements.iter().filter_map(|r| match &r.op {
            Operator::In(values) => Some((r.key.as_str(), values.as_slice())),
            _ => None,
        })
    }

    /// A key that must exist in every match (from `In` or `Exists`), for indexing.
    pub fn required_key(&self) -> Option<&str> {
        self.requirements.iter().find_map(|r| match &r.op {
            Operator::In(_) | Operator::Exists => Some(r.key.as_str()),
            _ => None,
        })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.requirements.is_empty() {
            return f.write_str("{} (all)");
        }
        f.write_str("{")?;
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            let key = format!("{}:{}", r.source.as_str(), r.key);
            match &r.op {
                Operator::In(v) if v.len() == 1 && v[0].is_empty() => write!(f, "{key}")?,
                Operator::In(v) if v.len() == 1 => write!(f, "{key}={}", v[0])?,
                Operator::In(v) => write!(f, "{key} in ({})", v.join(","))?,
                Operator::NotIn(v) => write!(f, "{key} notin ({})", v.join(","))?,
                Operator::Exists => write!(f, "{key}")?,
                Operator::DoesNotExist => write!(f, "!{key}")?,
            }
        }
        f.write_str("}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(s: &str) -> LabelSet {
        s.parse().unwrap()
    }

    #[test]
    fn operators() {
        let l = labels("app=web,tier=front,reserved:host");
        let sel = |r: Requirement| Selector::new(vec![r]);
        assert!(sel(Requirement::equals(Source::Any, "app", "web")).matches(&l));
        assert!(sel(Requirement::equals(Source::K8s, "app", "web")).matches(&l));
        assert!(!sel(Requirement::equals(Source::Container, "app", "web")).matches(&l));
        let not_in = |v: &[&str]| Requirement {
            source: Source::Any,
            key: "app".into(),
            op: Operator::NotIn(v.iter().map(|s| s.to_string()).collect()),
        };
        assert!(!sel(not_in(&["web"])).matches(&l));
        assert!(sel(not_in(&["db"])).matches(&l));
        assert!(
            sel(not_in(&["db"])).matches(&labels("other=1")),
            "absent key satisfies NotIn"
        );
        assert!(Selector::reserved("host").matches(&l));
        assert!(!Selector::reserved("world").matches(&l));
        assert!(Selector::wildcard().matches(&LabelSet::new()));
    }

    #[test]
    fn namespace_scoping_helpers() {
        let s = Selector::new(vec![Requirement::equals(Source::Any, "app", "web")])
            .in_namespace("prod");
        assert!(s.names_namespace());
        assert!(s.matches(&labels("app=web,io.kubernetes.pod.namespace=prod")));
        assert!(!s.matches(&labels("app=web,io.kubernetes.pod.namespace=dev")));
        assert_eq!(
            s.to_string(),
            "{k8s:io.kubernetes.pod.namespace=prod, any:app=web}"
        );
    }
}

#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;
    use crate::labels::Label;

    const KEYS: &[&str] = &["app", "tier", "io.kubernetes.pod.namespace"];
    const VALUES: &[&str] = &["a", "b", ""];

    fn arb_labels() -> impl Strategy<Value = LabelSet> {
        prop::collection::vec((0..KEYS.len(), 0..VALUES.len(), any::<bool>()), 0..4).prop_map(|v| {
            v.into_iter()
                .map(|(k, val, k8s)| {
                    Label::new(
                        if k8s { Source::K8s } else { Source::Container },
                        KEYS[k],
                        VALUES[val],
                    )
                })
                .collect()
        })
    }

    fn arb_requirement() -> impl Strategy<Value = Requirement> {
        let values = prop::collection::vec(prop::sample::select(VALUES.to_vec()), 1..3)
            .prop_map(|v| v.into_iter().map(str::to_string).collect::<Vec<_>>());
        let op = prop_oneof![
            values.clone().prop_map(Operator::In),
            values.prop_map(Operator::NotIn),
            Just(Operator::Exists),
            Just(Operator::DoesNotExist),
        ];
        let source = prop::sample::select(vec![Source::Any, Source::K8s, Source::Container]);
        (source, prop::sample::select(KEYS.to_vec()), op).prop_map(|(source, key, op)| {
            Requirement {
                source,
                key: key.to_string(),
                op,
            }
        })
    }

    fn arb_selector() -> impl Strategy<Value = Selector> {
        prop::collection::vec(arb_requirement(), 0..3).prop_map(Selector::new)
    }

    /// The Kubernetes definition, written independently of `Requirement::matches`.
    fn reference(r: &Requirement, labels: &LabelSet) -> bool {
        let values: Vec<&str> = labels
            .iter()
            .filter(|l| l.key == r.key && (r.source == Source::Any || r.source == l.source))
            .map(|l| l.value.as_str())
            .collect();
        match &r.op {
            Operator::In(v) => values.iter().any(|x| v.iter().any(|w| w == x)),
            Operator::NotIn(v) => values.iter().all(|x| v.iter().all(|w| w != x)),
            Operator::Exists => !values.is_empty(),
            Operator::DoesNotExist => values.is_empty(),
        }
    }

    proptest! {
        #[test]
        fn matches_the_kubernetes_definition(s in arb_selector(), l in arb_labels()) {
            prop_assert_eq!(s.matches(&l), s.requirements().iter().all(|r| reference(r, &l)));
        }

        #[test]
        fn and_is_conjunction(a in arb_selector(), b in arb_selector(), l in arb_labels()) {
            prop_assert_eq!(a.and(&b).matches(&l), a.matches(&l) && b.matches(&l));
        }

        #[test]
        fn namespace_confinement(s in arb_selector(), l in arb_labels()) {
            let confined = s.in_namespace("a");
            prop_assert_eq!(
                confined.matches(&l),
                s.matches(&l) && l.with_key(Source::K8s, NAMESPACE_LABEL).any(|x| x.value == "a")
            );
        }

        #[test]
        fn the_wildcard_matches_everything(l in arb_labels()) {
            prop_assert!(Selector::wildcard().matches(&l));
        }
    }
}
