//! Labels: `source:key=value` triples, and sorted sets of them.
//!
//! An identity is a set of labels. Selectors (`crate::selector`) match label sets; a selector key
//! without a source (or with `any:`) matches a label of any source, as in Cilium.

use std::fmt;
use std::str::FromStr;

use compact_str::CompactString;
use serde::{Serialize, Serializer};

/// Where a label came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// Kubernetes pod, namespace and service-account labels (and membrane endpoint labels).
    K8s,
    /// Labels membrane itself assigns: `reserved:host`, `reserved:world`, ...
    Reserved,
    /// Container runtime labels.
    Container,
    /// CIDR identities: `cidr:10.0.0.0/8`.
    Cidr,
    /// Labels whose source is not known.
    Unspec,
    /// Only in selectors: matches every source.
    Any,
}

impl Source {
    /// The prefix as written before the `:`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::K8s => "k8s",
            Source::Reserved => "reserved",
            Source::Container => "container",
            Source::Cidr => "cidr",
            Source::Unspec => "unspec",
            Source::Any => "any",
        }
    }

    fn parse(s: &str) -> Option<Source> {
        Some(match s {
            "k8s" => Source::K8s,
            "reserved" => Source::Reserved,
            "container" => Source::Container,
            "cidr" => Source::Cidr,
            "unspec" => Source::Unspec,
            "any" => Source::Any,
            _ => return None,
        })
    }

    /// Whether a selector key of this source matches a label of source `label`.
    pub fn matches(self, label: Source) -> bool {
        self == Source::Any || self == label
    }
}

impl Serialize for Source {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Splits `source:rest` when the text before the first `:` is a known source (and comes before
/// any `=`); otherwise the whole text is the rest and the source is `default`.
pub fn split_source(text: &str, default: Source) -> Result<(Source, &str), LabelError> {
    let colon = text.find(':');
    let equals = text.find('=');
    match colon {
        Some(c) if equals.is_none_or(|e| c < e) => {
            let prefix = &text[..c];
            if prefix == "$host" {
                return Ok((Source::Reserved, "host"));
            }
            Source::parse(prefix)
                .map(|s| (s, &text[c + 1..]))
                .ok_or_else(|| LabelError::UnknownSource(prefix.to_string()))
        }
        _ => Ok((default, text)),
    }
}

/// A label that could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    /// The prefix before `:` is not one of k8s, reserved, container, cidr, unspec, any.
    #[error("unknown label source {0:?} (expected k8s, reserved, container, cidr, unspec or any)")]
    UnknownSource(String),
    /// An empty key.
    #[error("empty label key")]
    EmptyKey,
    /// A key or value with characters labels cannot hold.
    #[error(
        "invalid label {0:?}: keys and values may not contain spaces, ',' or control characters"
    )]
    InvalidChars(String),
}

/// One label.
///
/// Keys and values are inline strings: up to 24 bytes (every CIDR label, most Kubernetes
/// labels) they need no allocation of their own, which matters with 10,000 CIDR identities of
/// ~31 labels each.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Label {
    /// The key, without the source.
    pub key: CompactString,
    /// The value (may be empty).
    pub value: CompactString,
    /// The source.
    pub source: Source,
}

impl Label {
    /// A label from its parts.
    pub fn new(
        source: Source,
        key: impl Into<CompactString>,
        value: impl Into<CompactString>,
    ) -> Label {
        Label {
            source,
            key: key.into(),
            value: value.into(),
        }
    }

    /// `reserved:<name>`.
    pub fn reserved(name: &str) -> Label {
        Label::new(Source::Reserved, name, "")
    }

    /// Parses `[source:]key[=value]`; a missing source becomes `default_source`.
    pub fn parse_with_default(text: &str, default_source: Source) -> Result<Label, LabelError> {
        let text = text.trim();
        let (source, rest) = split_source(text, default_source)?;
        let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
        if key.is_empty() {
            return Err(LabelError::EmptyKey);
        }
        let bad = |s: &str| s.chars().any(|c| c.is_control() || c == ',' || c == ' ');
        if bad(key) || bad(value) {
            return Err(LabelError::InvalidChars(text.to_string()));
        }
        Ok(Label::new(source, key, value))
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.source.as_str(), self.key)?;
        if !self.value.is_empty() {
            write!(f, "={}", self.value)?;
        }
        Ok(())
    }
}

impl Serialize for Label {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A set of labels, sorted by key (then source), without duplicates of the same source and key.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct LabelSet(Vec<Label>);

impl LabelSet {
    /// The empty set.
    pub fn new() -> LabelSet {
        LabelSet(Vec::new())
    }

    /// Adds a label, replacing one of the same source and key.
    pub fn insert(&mut self, label: Label) {
        match self
            .0
            .binary_search_by(|l| (&l.key, l.source).cmp(&(&label.key, label.source)))
        {
            Ok(i) => self.0[i] = label,
            Err(i) => self.0.insert(i, label),
        }
    }

    /// Removes labels with this key (of any source when `source` is `Any`).
    pub fn remove(&mut self, source: Source, key: &str) {
        self.0
            .retain(|l| !(l.key == key && source.matches(l.source)));
    }

    /// The labels with this key whose source `source` matches.
    pub fn with_key<'a, 'k>(
        &'a self,
        source: Source,
        key: &'k str,
    ) -> impl Iterator<Item = &'a Label> + use<'a, 'k> {
        let start = self.0.partition_point(|l| l.key.as_str() < key);
        self.0[start..]
            .iter()
            .take_while(move |l| l.key == key)
            .filter(move |l| source.matches(l.source))
    }

    /// Whether a label with this source and key exists.
    pub fn has_key(&self, source: Source, key: &str) -> bool {
        self.with_key(source, key).next().is_some()
    }

    /// The value of the first label with this key whose source matches.
    pub fn value<'a>(&'a self, source: Source, key: &str) -> Option<&'a str> {
        self.with_key(source, key).next().map(|l| l.value.as_str())
    }

    /// Whether the set holds `reserved:<name>`.
    pub fn has_reserved(&self, name: &str) -> bool {
        self.has_key(Source::Reserved, name)
    }

    /// The labels, sorted.
    pub fn iter(&self) -> impl Iterator<Item = &Label> {
        self.0.iter()
    }

    /// Number of labels.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no labels.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Parses a comma-separated `[source:]key=value` list, as the CLI takes it.
    pub fn parse_list(text: &str, default_source: Source) -> Result<LabelSet, LabelError> {
        let mut set = LabelSet::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            set.insert(Label::parse_with_default(part, default_source)?);
        }
        Ok(set)
    }
}

impl FromIterator<Label> for LabelSet {
    fn from_iter<I: IntoIterator<Item = Label>>(iter: I) -> Self {
        let mut set = LabelSet::new();
        for l in iter {
            set.insert(l);
        }
        set
    }
}

impl fmt::Display for LabelSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, l) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{l}")?;
        }
        Ok(())
    }
}

impl FromStr for LabelSet {
    type Err = LabelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LabelSet::parse_list(s, Source::K8s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        let l = Label::parse_with_default("k8s:app=web", Source::Any).unwrap();
        assert_eq!(
            (l.source, l.key.as_str(), l.value.as_str()),
            (Source::K8s, "app", "web")
        );
        let l = Label::parse_with_default("app.kubernetes.io/name=web", Source::K8s).unwrap();
        assert_eq!(l.source, Source::K8s);
        assert_eq!(l.key, "app.kubernetes.io/name");
        let l = Label::parse_with_default("reserved:world", Source::K8s).unwrap();
        assert_eq!((l.source, l.value.as_str()), (Source::Reserved, ""));
        // A colon inside the value is not a source separator.
        let l = Label::parse_with_default("url=http://x", Source::K8s).unwrap();
        assert_eq!(l.value, "http://x");
        assert!(Label::parse_with_default("bogus:app=x", Source::K8s).is_err());
        assert!(Label::parse_with_default("=x", Source::K8s).is_err());
    }

    #[test]
    fn set_is_sorted_and_deduplicated() {
        let set: LabelSet = "b=1,a=2,k8s:b=3".parse().unwrap();
        assert_eq!(set.to_string(), "k8s:a=2,k8s:b=3");
        assert_eq!(set.value(Source::Any, "b"), Some("3"));
        assert!(!set.has_key(Source::Container, "b"));
    }
}
