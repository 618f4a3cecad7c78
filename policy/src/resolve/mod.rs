//! Resolution: rules + identities → one [`PolicyTable`] per endpoint identity, kept up to date
//! incrementally.
//!
//! ```text
//!  rules ──> selectors (interned) ──> selector cache: selector → matching identities
//!                                        ▲  (label index finds candidates)
//!  identities ───────────────────────────┘
//!  endpoint identity E: rules selecting E (cache of endpoint selectors)
//!                       × their items' peers (ANDed with E's requires)  → keys of E's table
//! ```
//!
//! Each interned selector remembers which (endpoint, rule item) uses it, so a new identity only
//! touches the tables whose peers it matches, and a rule change only recomputes the endpoints the
//! old or new rule selects.

mod index;
pub mod table;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use crate::identity::{Identity, NumericIdentity};
use crate::rule::{Direction, EnforcementMode, Peers, Rule};
use crate::selector::Selector;
use index::LabelIndex;
pub use table::{
    Contribution, DirectionTable, Effective, L7Policy, PROBE_ORDER, PolicyKey, PolicyTable,
    Verdict, first_allowing_http, judge_kafka_sets, judge_kafka_sets_credited, probe,
};

/// An interned selector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct SelectorId(u32);

/// Stable id of a rule inside the resolver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct RuleId(u32);

/// Who uses a selector: an item of a rule, for an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Use {
    endpoint: NumericIdentity,
    rule: RuleId,
    direction: Direction,
    item: usize,
}

#[derive(Debug)]
struct CachedSelector {
    selector: Selector,
    matches: BTreeSet<NumericIdentity>,
    users: HashSet<Use>,
    /// References from rules' endpoint selectors (which have no per-endpoint users).
    subject_refs: usize,
}

#[derive(Debug)]
struct EndpointState {
    rules: Vec<RuleId>,
    uses: Vec<(SelectorId, Use)>,
    table: PolicyTable,
}

/// What an update changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangeSet {
    /// Endpoint identities whose tables changed.
    pub endpoints: BTreeSet<NumericIdentity>,
}

/// The incremental resolver.
#[derive(Debug, Default)]
pub struct Resolver {
    mode: EnforcementMode,
    rules: BTreeMap<RuleId, Arc<Rule>>,
    rule_subject: HashMap<RuleId, SelectorId>,
    /// Rules by an equality their endpoint selector requires (key → value → rules), so that the
    /// rules selecting an endpoint are found without checking every rule.
    subject_index: HashMap<String, HashMap<String, BTreeSet<RuleId>>>,
    /// Rules whose endpoint selector has no equality to index by.
    subject_unindexed: BTreeSet<RuleId>,
    next_rule: u32,
    identities: BTreeMap<NumericIdentity, Arc<Identity>>,
    label_index: LabelIndex,
    selector_ids: HashMap<Selector, SelectorId>,
    selectors: Vec<Option<CachedSelector>>,
    free_selector_ids: Vec<u32>,
    endpoints: BTreeMap<NumericIdentity, EndpointState>,
}

impl Resolver {
    /// A resolver with no rules, identities or endpoints.
    pub fn new(mode: EnforcementMode) -> Resolver {
        Resolver {
            mode,
            ..Default::default()
        }
    }

    /// The enforcement mode.
    pub fn mode(&self) -> EnforcementMode {
        self.mode
    }

    /// The table of an endpoint identity.
    pub fn table(&self, endpoint: NumericIdentity) -> Option<&PolicyTable> {
        self.endpoints.get(&endpoint).map(|e| &e.table)
    }

    /// Every endpoint identity with a table.
    pub fn endpoint_ids(&self) -> impl Iterator<Item = NumericIdentity> + '_ {
        self.endpoints.keys().copied()
    }

    /// A known identity.
    pub fn identity(&self, id: NumericIdentity) -> Option<&Arc<Identity>> {
        self.identities.get(&id)
    }

    /// Every known identity.
    pub fn identities(&self) -> impl Iterator<Item = &Arc<Identity>> {
        self.identities.values()
    }

    /// The rules, in the order they were added.
    pub fn rules(&self) -> impl Iterator<Item = &Arc<Rule>> {
        self.rules.values()
    }

    /// Number of interned selectors (for metrics and benchmarks).
    pub fn selector_count(&self) -> usize {
        self.selectors.iter().filter(|s| s.is_some()).count()
    }

    // ---- identities ----

    /// Makes an identity known: it becomes a possible peer of every table. Returns the tables
    /// that changed.
    pub fn add_identity(&mut self, identity: Identity) -> ChangeSet {
        let mut changes = ChangeSet::default();
        let id = identity.id;
        if self.identities.contains_key(&id) {
            changes.endpoints.extend(self.remove_identity(id).endpoints);
        }
        let identity = Arc::new(identity);
        for l in identity.labels.iter() {
            self.label_index.insert(&l.key, &l.value, id);
        }
        self.identities.insert(id, identity.clone());
        let mut touched_uses = Vec::new();
        for cached in self.selectors.iter_mut().flatten() {
            if cached.selector.matches(&identity.labels) {
                cached.matches.insert(id);
                touched_uses.extend(cached.users.iter().copied());
            }
        }
        for u in touched_uses {
            if self.add_item_contributions(u, &[id]) {
                changes.endpoints.insert(u.endpoint);
            }
        }
        // A rule's endpoint selector that now matches an existing endpoint cannot happen: an
        // endpoint's labels are its identity's, and this identity is new.
        changes
    }

    /// Forgets an identity: removes it from every table (and drops its own table).
    pub fn remove_identity(&mut self, id: NumericIdentity) -> ChangeSet {
        let mut changes = ChangeSet::default();
        let Some(identity) = self.identities.remove(&id) else {
            return changes;
        };
        for l in identity.labels.iter() {
            self.label_index.remove(&l.key, &l.value, id);
        }
        let mut endpoints = BTreeSet::new();
        for cached in self.selectors.iter_mut().flatten() {
            if cached.matches.remove(&id) {
                endpoints.extend(cached.users.iter().map(|u| u.endpoint));
            }
        }
        for e in endpoints {
            if let Some(state) = self.endpoints.get_mut(&e) {
                let a = state.table.ingress.remove_identity(id);
                let b = state.table.egress.remove_identity(id);
                if !a.is_empty() || !b.is_empty() {
                    changes.endpoints.insert(e);
                }
            }
        }
        if self.endpoints.contains_key(&id) {
            self.remove_endpoint(id);
            changes.endpoints.insert(id);
        }
        changes
    }

    // ---- endpoints ----

    /// Computes (or recomputes) the table of a known identity that is a local endpoint.
    pub fn add_endpoint(&mut self, id: NumericIdentity) -> ChangeSet {
        let mut changes = ChangeSet::default();
        if !self.identities.contains_key(&id) {
            return changes;
        }
        self.remove_endpoint(id);
        let labels = &self.identities[&id].labels;
        let mut candidates = self.subject_unindexed.clone();
        for l in labels.iter() {
            if let Some(rules) = self
                .subject_index
                .get(l.key.as_str())
                .and_then(|m| m.get(l.value.as_str()))
            {
                candidates.extend(rules.iter().copied());
            }
        }
        let rules: Vec<RuleId> = candidates
            .into_iter()
            .filter(|r| {
                self.rules
                    .get(r)
                    .is_some_and(|rule| rule.endpoint_selector.matches(labels))
            })
            .collect();
        self.endpoints.insert(
            id,
            EndpointState {
                rules,
                uses: Vec::new(),
                table: PolicyTable::default(),
            },
        );
        self.compute_endpoint(id);
        changes.endpoints.insert(id);
        changes
    }

    /// Drops the table of an endpoint (the identity stays known as a peer).
    pub fn remove_endpoint(&mut self, id: NumericIdentity) -> bool {
        let Some(state) = self.endpoints.remove(&id) else {
            return false;
        };
        for (sid, u) in state.uses {
            self.unuse(sid, &u);
        }
        true
    }

    // ---- rules ----

    /// Replaces the rule set. Rules that did not change keep their state; endpoints selected by
    /// an added, removed or changed rule are recomputed, and only those.
    pub fn set_rules(&mut self, rules: &[Arc<Rule>]) -> ChangeSet {
        // The same Arc is the same rule (a caller that kept an unchanged file's parse); other
        // rules are compared by content.
        let mut by_ptr: HashMap<*const Rule, Vec<RuleId>> = HashMap::new();
        for (id, r) in &self.rules {
            by_ptr.entry(Arc::as_ptr(r)).or_default().push(*id);
        }
        let mut unmatched_new = Vec::new();
        for r in rules {
            if by_ptr
                .get_mut(&Arc::as_ptr(r))
                .and_then(|ids| ids.pop())
                .is_none()
            {
                unmatched_new.push(r.clone());
            }
        }
        let unmatched_old: Vec<RuleId> = by_ptr.into_values().flatten().collect();
        let fingerprint = |r: &Rule| format!("{r:?}");
        let mut old: HashMap<String, Vec<RuleId>> = HashMap::new();
        for id in unmatched_old {
            old.entry(fingerprint(&self.rules[&id]))
                .or_default()
                .push(id);
        }
        let mut added = Vec::new();
        for r in unmatched_new {
            if old
                .get_mut(&fingerprint(&r))
                .and_then(|ids| ids.pop())
                .is_none()
            {
                added.push(r);
            }
        }
        let removed: Vec<RuleId> = old.into_values().flatten().collect();
        self.update_rules(added, &removed)
    }

    fn update_rules(&mut self, added: Vec<Arc<Rule>>, removed: &[RuleId]) -> ChangeSet {
        let mut affected = BTreeSet::new();
        for rid in removed {
            if let Some(sid) = self.rule_subject.remove(rid) {
                affected.extend(self.cached(sid).matches.iter().copied());
                self.release_subject(sid);
            }
            if let Some(rule) = self.rules.remove(rid) {
                match rule.endpoint_selector.index_hint() {
                    Some((key, values)) => {
                        for v in values {
                            if let Some(set) =
                                self.subject_index.get_mut(key).and_then(|m| m.get_mut(v))
                            {
                                set.remove(rid);
                            }
                        }
                    }
                    None => {
                        self.subject_unindexed.remove(rid);
                    }
                }
            }
        }
        for rule in added {
            let rid = RuleId(self.next_rule);
            self.next_rule += 1;
            let sid = self.intern(&rule.endpoint_selector);
            self.selectors[sid.0 as usize]
                .as_mut()
                .expect("interned above")
                .subject_refs += 1;
            affected.extend(self.cached(sid).matches.iter().copied());
            self.rule_subject.insert(rid, sid);
            match rule.endpoint_selector.index_hint() {
                Some((key, values)) => {
                    for v in values {
                        self.subject_index
                            .entry(key.to_string())
                            .or_default()
                            .entry(v.clone())
                            .or_default()
                            .insert(rid);
                    }
                }
                None => {
                    self.subject_unindexed.insert(rid);
                }
            }
            self.rules.insert(rid, rule);
        }
        let mut changes = ChangeSet::default();
        for e in affected {
            if self.endpoints.contains_key(&e) {
                changes.endpoints.extend(self.add_endpoint(e).endpoints);
            }
        }
        changes
    }

    // ---- internals ----

    fn cached(&self, sid: SelectorId) -> &CachedSelector {
        self.selectors[sid.0 as usize]
            .as_ref()
            .expect("selector ids stay valid while used")
    }

    fn intern(&mut self, selector: &Selector) -> SelectorId {
        if let Some(id) = self.selector_ids.get(selector) {
            return *id;
        }
        let matches = self.match_all(selector);
        let cached = CachedSelector {
            selector: selector.clone(),
            matches,
            users: HashSet::new(),
            subject_refs: 0,
        };
        let id = match self.free_selector_ids.pop() {
            Some(i) => {
                self.selectors[i as usize] = Some(cached);
                SelectorId(i)
            }
            None => {
                self.selectors.push(Some(cached));
                SelectorId(
                    u32::try_from(self.selectors.len() - 1).expect("fewer than 2^32 selectors"),
                )
            }
        };
        self.selector_ids.insert(selector.clone(), id);
        id
    }

    fn maybe_free(&mut self, sid: SelectorId) {
        // An endpoint may list the same (selector, use) twice (two identical peer selectors in
        // one item); the second release finds the selector already gone.
        let Some(c) = self.selectors[sid.0 as usize].as_ref() else {
            return;
        };
        if c.users.is_empty() && c.subject_refs == 0 {
            let c = self.selectors[sid.0 as usize]
                .take()
                .expect("checked above");
            self.selector_ids.remove(&c.selector);
            self.free_selector_ids.push(sid.0);
        }
    }

    fn release_subject(&mut self, sid: SelectorId) {
        if let Some(c) = self.selectors[sid.0 as usize].as_mut() {
            c.subject_refs -= 1;
        }
        self.maybe_free(sid);
    }

    fn unuse(&mut self, sid: SelectorId, u: &Use) {
        if let Some(c) = self.selectors[sid.0 as usize].as_mut() {
            c.users.remove(u);
        }
        self.maybe_free(sid);
    }

    /// The known identities a selector matches, using the label index for candidates.
    fn match_all(&self, selector: &Selector) -> BTreeSet<NumericIdentity> {
        let check = |id: &NumericIdentity| {
            self.identities
                .get(id)
                .is_some_and(|i| selector.matches(&i.labels))
        };
        // The smallest posting list among the selector's equalities gives the fewest candidates.
        let postings = selector.equalities().map(|(key, values)| {
            let lists: Vec<&[NumericIdentity]> = values
                .iter()
                .map(|v| self.label_index.get(key, v))
                .collect();
            let size: usize = lists.iter().map(|l| l.len()).sum();
            (size, lists)
        });
        if let Some((_, lists)) = postings.min_by_key(|(size, _)| *size) {
            return lists
                .into_iter()
                .flatten()
                .filter(|id| check(id))
                .copied()
                .collect();
        }
        if let Some(key) = selector.required_key() {
            return self
                .label_index
                .with_key(key)
                .flatten()
                .filter(|id| check(id))
                .copied()
                .collect();
        }
        self.identities
            .values()
            .filter(|i| selector.matches(&i.labels))
            .map(|i| i.id)
            .collect()
    }

    /// The remote selectors of a rule item for an endpoint: its peers ANDed with the endpoint's
    /// requires. `None` inside means "any identity" (the wildcard key).
    fn item_remotes(
        rule: &Rule,
        dir: Direction,
        item: usize,
        requires: &Option<Selector>,
    ) -> Vec<Option<Selector>> {
        let with_requires = |s: &Selector| match requires {
            Some(r) => s.and(r),
            None => s.clone(),
        };
        match &rule.items(dir)[item].peers {
            Peers::Any => vec![requires.clone()],
            Peers::Selected(sels) => sels
                .iter()
                .map(|p| {
                    let s = with_requires(&p.selector);
                    (!s.is_wildcard()).then_some(s)
                })
                .collect(),
        }
    }

    fn compute_endpoint(&mut self, e: NumericIdentity) {
        let state = self.endpoints.get(&e).expect("inserted by the caller");
        let rules: Vec<Arc<Rule>> = state
            .rules
            .iter()
            .filter_map(|r| self.rules.get(r).cloned())
            .collect();
        let rule_ids = state.rules.clone();
        let mut table = PolicyTable::default();
        for dir in [Direction::Ingress, Direction::Egress] {
            table.direction_mut(dir).enforced = match self.mode {
                EnforcementMode::Always => true,
                EnforcementMode::Never => false,
                EnforcementMode::Default => rules.iter().any(|r| r.enforces(dir)),
            };
        }
        self.endpoints.get_mut(&e).expect("present").table = table;
        if self.mode == EnforcementMode::Never {
            return;
        }
        for dir in [Direction::Ingress, Direction::Egress] {
            let requires: Vec<&Selector> = rules.iter().flat_map(|r| r.requires(dir)).collect();
            let requires = (!requires.is_empty()).then(|| {
                requires
                    .iter()
                    .fold(Selector::wildcard(), |acc, s| acc.and(s))
            });
            for (rid, rule) in rule_ids.iter().zip(&rules) {
                for item in 0..rule.items(dir).len() {
                    let u = Use {
                        endpoint: e,
                        rule: *rid,
                        direction: dir,
                        item,
                    };
                    for remote in Self::item_remotes(rule, dir, item, &requires) {
                        match remote {
                            None => {
                                self.add_item_contributions(u, &[NumericIdentity::UNKNOWN]);
                            }
                            Some(sel) => {
                                let sid = self.intern(&sel);
                                let c = self.selectors[sid.0 as usize].as_mut().expect("interned");
                                c.users.insert(u);
                                let ids: Vec<NumericIdentity> = c.matches.iter().copied().collect();
                                self.endpoints
                                    .get_mut(&e)
                                    .expect("present")
                                    .uses
                                    .push((sid, u));
                                self.add_item_contributions(u, &ids);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Adds the keys of one rule item for the given remote identities. Returns whether anything
    /// was added.
    fn add_item_contributions(&mut self, u: Use, remotes: &[NumericIdentity]) -> bool {
        let Some(rule) = self.rules.get(&u.rule).cloned() else {
            return false;
        };
        let Some(state) = self.endpoints.get_mut(&u.endpoint) else {
            return false;
        };
        if remotes.is_empty() {
            return false;
        }
        let item = &rule.items(u.direction)[u.item];
        let table = state.table.direction_mut(u.direction);
        for remote in remotes {
            if item.ports.is_empty() {
                table.add(
                    PolicyKey::new(*remote, 0, None),
                    Contribution {
                        rule: rule.clone(),
                        direction: u.direction,
                        item: u.item,
                        port_rule: None,
                    },
                );
                continue;
            }
            for pr in &item.ports {
                for pp in &pr.ports {
                    for proto in pp.protocol.expand() {
                        table.add(
                            PolicyKey::new(*remote, pp.port, Some(*proto)),
                            Contribution {
                                rule: rule.clone(),
                                direction: u.direction,
                                item: u.item,
                                port_rule: Some(pr.clone()),
                            },
                        );
                    }
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests;
