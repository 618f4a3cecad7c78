//! Kafka rules: role or API key, API version, client id and topic, with Cilium's semantics.
//!
//! Rules on a port are ORed. A rule applies to a request when the request's API key is in the
//! rule's key set (any key when the rule names neither role nor key), its version equals the
//! rule's (when set) and its client id equals the rule's (when set). A rule without a topic then
//! allows the request. Rules with a topic allow topics one by one: a request is allowed only when
//! every topic it names is allowed by some applicable rule. A request whose API key carries no
//! topics passes a topic rule; a topic-carrying request whose topics are unknown never does.

use serde::Serialize;

/// `role: produce` expands to these API keys.
pub const PRODUCE_KEYS: &[i16] = &[0, 3, 18];
/// `role: consume` expands to these API keys.
pub const CONSUME_KEYS: &[i16] = &[1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18];

/// API key names accepted in `apiKey` (lower case), with their numbers. The first 34 are
/// Cilium's names; the rest are the Kafka protocol's later request types.
pub const API_KEYS: &[(&str, i16)] = &[
    ("produce", 0),
    ("fetch", 1),
    ("offsets", 2),
    ("listoffsets", 2),
    ("metadata", 3),
    ("leaderandisr", 4),
    ("stopreplica", 5),
    ("updatemetadata", 6),
    ("controlledshutdown", 7),
    ("offsetcommit", 8),
    ("offsetfetch", 9),
    ("findcoordinator", 10),
    ("joingroup", 11),
    ("heartbeat", 12),
    ("leavegroup", 13),
    ("syncgroup", 14),
    ("describegroups", 15),
    ("listgroups", 16),
    ("saslhandshake", 17),
    ("apiversions", 18),
    ("createtopics", 19),
    ("deletetopics", 20),
    ("deleterecords", 21),
    ("initproducerid", 22),
    ("offsetforleaderepoch", 23),
    ("addpartitionstotxn", 24),
    ("addoffsetstotxn", 25),
    ("endtxn", 26),
    ("writetxnmarkers", 27),
    ("txnoffsetcommit", 28),
    ("describeacls", 29),
    ("createacls", 30),
    ("deleteacls", 31),
    ("describeconfigs", 32),
    ("alterconfigs", 33),
    ("alterreplicalogdirs", 34),
    ("describelogdirs", 35),
    ("saslauthenticate", 36),
    ("createpartitions", 37),
    ("createdelegationtoken", 38),
    ("renewdelegationtoken", 39),
    ("expiredelegationtoken", 40),
    ("describedelegationtoken", 41),
    ("deletegroups", 42),
    ("electleaders", 43),
    ("incrementalalterconfigs", 44),
    ("alterpartitionreassignments", 45),
    ("listpartitionreassignments", 46),
    ("offsetdelete", 47),
    ("describeclientquotas", 48),
    ("alterclientquotas", 49),
    ("describeuserscramcredentials", 50),
    ("alteruserscramcredentials", 51),
    ("describecluster", 60),
    ("describeproducers", 61),
    ("describetransactions", 65),
    ("listtransactions", 66),
    ("consumergroupheartbeat", 68),
    ("consumergroupdescribe", 69),
];

/// The API key for a name (case-insensitive) or a decimal number.
pub fn api_key_from_name(name: &str) -> Option<i16> {
    let lower = name.to_ascii_lowercase();
    API_KEYS
        .iter()
        .find(|(n, _)| *n == lower)
        .map(|(_, k)| *k)
        .or_else(|| name.parse::<i16>().ok().filter(|k| *k >= 0))
}

/// The canonical name of an API key, if it has one.
pub fn api_key_name(key: i16) -> Option<&'static str> {
    API_KEYS
        .iter()
        .find(|(n, k)| *k == key && *n != "offsets")
        .map(|(n, _)| *n)
}

/// Whether requests with this API key name topics (and so are subject to topic rules).
pub fn carries_topics(key: i16) -> bool {
    matches!(key, 0..=6 | 8 | 9 | 19..=21 | 23 | 24 | 27 | 28 | 34 | 35 | 37 | 43 | 45..=47 | 61)
}

/// A Kafka role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Produce, Metadata, ApiVersions.
    Produce,
    /// Fetch, ListOffsets, Metadata, the group and offset APIs, ApiVersions.
    Consume,
}

impl Role {
    /// The API keys the role stands for.
    pub fn api_keys(self) -> &'static [i16] {
        match self {
            Role::Produce => PRODUCE_KEYS,
            Role::Consume => CONSUME_KEYS,
        }
    }

    /// `produce` or `consume` (any case).
    pub fn from_name(name: &str) -> Option<Role> {
        match name.to_ascii_lowercase().as_str() {
            "produce" => Some(Role::Produce),
            "consume" => Some(Role::Consume),
            _ => None,
        }
    }

    /// The role's name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Produce => "produce",
            Role::Consume => "consume",
        }
    }
}

/// Maximum topic length accepted (Cilium keeps 255 for compatibility; Kafka itself uses 249).
pub const MAX_TOPIC_LEN: usize = 255;

/// Whether `topic` is a valid topic name: 1..=255 characters of `[a-zA-Z0-9._-]`.
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= MAX_TOPIC_LEN
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// One Kafka rule.
#[derive(Clone, Debug, Serialize)]
pub struct KafkaRule {
    /// Index in the port's `rules.kafka` list.
    pub index: usize,
    /// `role`, if given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// `apiKey` as written, if given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// The API keys this rule applies to; empty means every key.
    #[serde(skip)]
    pub api_keys: Vec<i16>,
    /// `apiVersion`: exact match when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_version: Option<i16>,
    /// `clientID`: exact match when set.
    #[serde(rename = "clientID", skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// `topic`: exact match when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
}

/// The facts about one Kafka request that rules look at.
#[derive(Clone, Copy, Debug)]
pub struct KafkaRequest<'a> {
    /// API key.
    pub api_key: i16,
    /// API version.
    pub api_version: i16,
    /// Client id from the request header (None when null).
    pub client_id: Option<&'a str>,
    /// Topics the request names; `None` when they could not be extracted (or the request means
    /// "all topics"), which no topic rule allows.
    pub topics: Option<&'a [&'a str]>,
}

impl KafkaRule {
    /// A rule from its fields as policy writes them (role and apiKey exclude each other; the key
    /// is a name or a number; the topic must be valid).
    pub fn new(
        index: usize,
        role: Option<&str>,
        api_key: Option<&str>,
        api_version: Option<i16>,
        client_id: Option<String>,
        topic: Option<String>,
    ) -> Result<KafkaRule, String> {
        let role = match role {
            Some(r) => Some(
                Role::from_name(r)
                    .ok_or_else(|| format!("unknown role {r:?} (expected produce or consume)"))?,
            ),
            None => None,
        };
        let api_keys = match (role, api_key) {
            (Some(_), Some(_)) => return Err("role and apiKey are mutually exclusive".into()),
            (Some(r), None) => r.api_keys().to_vec(),
            (None, Some(k)) => {
                vec![api_key_from_name(k).ok_or_else(|| format!("unknown apiKey {k:?}"))?]
            }
            (None, None) => Vec::new(),
        };
        if let Some(t) = &topic
            && !valid_topic(t)
        {
            return Err(format!("invalid topic {t:?}"));
        }
        Ok(KafkaRule {
            index,
            role,
            api_key: api_key.map(str::to_string),
            api_keys,
            api_version,
            client_id,
            topic,
        })
    }

    /// Whether the rule applies to this request's key, version and client id.
    pub fn applies_to(&self, req: &KafkaRequest<'_>) -> bool {
        (self.api_keys.is_empty() || self.api_keys.contains(&req.api_key))
            && self.api_version.is_none_or(|v| v == req.api_version)
            && self
                .client_id
                .as_deref()
                .is_none_or(|c| req.client_id == Some(c))
    }
}

/// The outcome of judging a Kafka request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KafkaVerdict {
    /// Allowed; the indexes of the rules that allowed it.
    Allow(Vec<usize>),
    /// Denied; the topics no rule allowed (empty when no rule applied at all).
    Deny {
        /// Topics of the request that no applicable rule allowed.
        denied_topics: Vec<String>,
    },
}

impl KafkaVerdict {
    /// Whether the request may pass.
    pub fn is_allowed(&self) -> bool {
        matches!(self, KafkaVerdict::Allow(_))
    }
}

/// Judges a request against the rules of one port (which are ORed as described above).
pub fn judge<'r>(
    rules: impl IntoIterator<Item = &'r KafkaRule>,
    req: &KafkaRequest<'_>,
) -> KafkaVerdict {
    let topic_carrying = carries_topics(req.api_key);
    let mut remaining: Vec<&str> = match req.topics {
        Some(t) if topic_carrying => t.to_vec(),
        _ => Vec::new(),
    };
    let mut used = Vec::new();
    let mut any_applied = false;
    for rule in rules {
        if !rule.applies_to(req) {
            continue;
        }
        any_applied = true;
        match &rule.topic {
            None => return KafkaVerdict::Allow(vec![rule.index]),
            Some(_) if !topic_carrying => return KafkaVerdict::Allow(vec![rule.index]),
            Some(topic) => {
                if req.topics.is_none() {
                    continue;
                }
                let before = remaining.len();
                remaining.retain(|t| t != topic);
                if remaining.len() != before || before == 0 {
                    used.push(rule.index);
                }
                if remaining.is_empty() {
                    return KafkaVerdict::Allow(used);
                }
            }
        }
    }
    let denied_topics = if any_applied {
        remaining.iter().map(|t| t.to_string()).collect()
    } else {
        req.topics
            .unwrap_or_default()
            .iter()
            .map(|t| t.to_string())
            .collect()
    };
    KafkaVerdict::Deny { denied_topics }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(role: Option<Role>, key: Option<&str>, topic: Option<&str>) -> KafkaRule {
        let api_keys = match (role, key) {
            (Some(Role::Produce), _) => PRODUCE_KEYS.to_vec(),
            (Some(Role::Consume), _) => CONSUME_KEYS.to_vec(),
            (None, Some(k)) => vec![api_key_from_name(k).unwrap()],
            (None, None) => vec![],
        };
        KafkaRule {
            index: 0,
            role,
            api_key: key.map(str::to_string),
            api_keys,
            api_version: None,
            client_id: None,
            topic: topic.map(str::to_string),
        }
    }

    fn req<'a>(key: i16, topics: Option<&'a [&'a str]>) -> KafkaRequest<'a> {
        KafkaRequest {
            api_key: key,
            api_version: 3,
            client_id: Some("c1"),
            topics,
        }
    }

    #[test]
    fn roles_expand() {
        let produce = rule(Some(Role::Produce), None, Some("empire-announce"));
        let rules = [produce];
        assert!(judge(&rules, &req(0, Some(&["empire-announce"]))).is_allowed());
        assert!(
            judge(&rules, &req(18, None)).is_allowed(),
            "ApiVersions carries no topic"
        );
        assert!(
            !judge(&rules, &req(1, Some(&["empire-announce"]))).is_allowed(),
            "fetch is not produce"
        );
        assert!(!judge(&rules, &req(0, Some(&["deathstar-plans"]))).is_allowed());
    }

    #[test]
    fn every_topic_must_be_allowed() {
        let mut a = rule(None, Some("produce"), Some("a"));
        let mut b = rule(None, Some("produce"), Some("b"));
        a.index = 0;
        b.index = 1;
        let rules = [a, b];
        assert_eq!(
            judge(&rules, &req(0, Some(&["a", "b"]))),
            KafkaVerdict::Allow(vec![0, 1])
        );
        assert_eq!(
            judge(&rules, &req(0, Some(&["a", "c"]))),
            KafkaVerdict::Deny {
                denied_topics: vec!["c".into()]
            }
        );
        assert!(
            !judge(&rules, &req(0, None)).is_allowed(),
            "unknown topics never pass a topic rule"
        );
    }

    #[test]
    fn version_and_client_id_are_exact() {
        let mut r = rule(None, Some("fetch"), None);
        r.api_version = Some(3);
        r.client_id = Some("c1".into());
        let rules = [r];
        assert!(judge(&rules, &req(1, Some(&["x"]))).is_allowed());
        let mut other = req(1, Some(&["x"]));
        other.api_version = 4;
        assert!(!judge(&rules, &other).is_allowed());
        other.api_version = 3;
        other.client_id = None;
        assert!(!judge(&rules, &other).is_allowed());
    }

    #[test]
    fn rules_from_their_written_fields() {
        let r = KafkaRule::new(0, Some("Produce"), None, None, None, Some("t".into())).unwrap();
        assert_eq!(r.api_keys, PRODUCE_KEYS);
        let r = KafkaRule::new(1, None, Some("fetch"), Some(4), Some("c".into()), None).unwrap();
        assert_eq!((r.api_keys.as_slice(), r.api_version), (&[1][..], Some(4)));
        for (role, key, topic) in [
            (Some("produce"), Some("fetch"), None),
            (Some("admin"), None, None),
            (None, Some("nosuch"), None),
            (None, None, Some("bad topic")),
        ] {
            assert!(
                KafkaRule::new(0, role, key, None, None, topic.map(str::to_string)).is_err(),
                "{role:?} {key:?} {topic:?}"
            );
        }
    }

    #[test]
    fn key_names() {
        assert_eq!(api_key_from_name("Produce"), Some(0));
        assert_eq!(api_key_from_name("offsets"), Some(2));
        assert_eq!(api_key_from_name("18"), Some(18));
        assert_eq!(api_key_from_name("nosuch"), None);
        assert_eq!(api_key_name(2), Some("listoffsets"));
        assert!(valid_topic("empire-announce"));
        assert!(!valid_topic("bad topic"));
        assert!(!valid_topic(&"a".repeat(256)));
    }
}
