//! Status conditions (`meta.v1.Condition`): their types and reasons, declared per kind with [`conditions!`] so that
//! the code can set no condition or reason the CRD's description does not list (the description is generated from
//! the same declaration, [`describe`]), and the one helper that sets them.
//!
//! `lastTransitionTime` changes only when a condition's status flips; everything else (reason, message,
//! observedGeneration) is updated in place.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Summary condition: the resource is fully in effect.
pub const READY: &str = "Ready";

/// A reason and its meaning, as a CRD's description lists it.
#[derive(Clone, Copy, Debug)]
pub struct Described {
    pub name: &'static str,
    /// The doc comment's lines.
    pub doc: &'static [&'static str],
}

/// A closed set of reasons. Reasons are PascalCase and stable: alerts and scripts match on them.
pub trait ReasonSet: Copy + std::fmt::Debug + Send + Sync + 'static {
    /// What the set is about, from its doc comment.
    const SUMMARY: &'static [&'static str];
    /// Every reason of the set with its meaning.
    const DOCS: &'static [Described];
    /// The set this one wraps (e.g. a job's failure reasons), if any: its summary and reasons.
    const MORE: (&'static [&'static str], &'static [Described]) = (&[], &[]);
    fn as_str(self) -> &'static str;
}

/// The reasons of one condition type (the enum's name is the type's name) and how the type bears on `Ready`.
pub trait Reason: ReasonSet {
    const TYPE: &'static str;
    const GATE: Gate;
    /// The status type of the kind that reports the condition: a condition of another kind does not compile.
    type Status;
}

/// The reasons of a kind's Events besides `Ready`'s.
pub trait EventReason: ReasonSet {
    /// The status type of the kind whose controller records them: another kind's Event reason does not compile.
    type Status;
}

/// How a condition bears on `Ready`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Ready is False unless this condition is True.
    Required,
    /// Ready is False while this condition is False; Unknown (not checked yet) does not hold it back.
    BlocksWhenFalse,
    /// Ready does not depend on it (a False is a warning, or just a fact such as no pod isolated).
    Warning,
}

impl Gate {
    /// Whether a condition of this gate and status holds `Ready` back.
    pub fn holds_back(self, status: Status) -> bool {
        match self {
            Gate::Required => status != Status::True,
            Gate::BlocksWhenFalse => status == Status::False,
            Gate::Warning => false,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Gate::Required => "Ready is False unless it is True",
            Gate::BlocksWhenFalse => "Ready is False while it is False",
            Gate::Warning => "Ready does not depend on it",
        }
    }
}

/// One condition type of a kind, as its CRD's description lists it.
#[derive(Clone, Copy, Debug)]
pub struct ConditionDoc {
    pub type_: &'static str,
    pub gate: Gate,
    pub doc: &'static [&'static str],
    pub reasons: &'static [Described],
    /// A wrapped set's summary and reasons.
    pub more: (&'static [&'static str], &'static [Described]),
}

impl ConditionDoc {
    pub const fn of<R: Reason>() -> ConditionDoc {
        ConditionDoc { type_: R::TYPE, gate: R::GATE, doc: R::SUMMARY, reasons: R::DOCS, more: R::MORE }
    }
}

/// Declares a closed set of reasons: an enum whose variants are the reasons, documented by their doc comments. With
/// `+ Inner` it also holds every reason of the set `Inner` (as `Of(Inner)`, and `From<Inner>`).
macro_rules! reasons {
    (
        $(#[doc = $doc:literal])*
        $vis:vis enum $Set:ident { $( $(#[doc = $rdoc:literal])* $R:ident ),* $(,)? } $(+ $Inner:ident)?
    ) => {
        $(#[doc = $doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        $vis enum $Set {
            $( $(#[doc = $rdoc])* $R, )*
            $(
                /// A reason of the wrapped set.
                Of($Inner),
            )?
        }

        impl $crate::api::condition::ReasonSet for $Set {
            const SUMMARY: &'static [&'static str] = &[$($doc),*];
            const DOCS: &'static [$crate::api::condition::Described] =
                &[$( $crate::api::condition::Described { name: stringify!($R), doc: &[$($rdoc),*] } ),*];
            $( const MORE: (&'static [&'static str], &'static [$crate::api::condition::Described]) = (
                <$Inner as $crate::api::condition::ReasonSet>::SUMMARY,
                <$Inner as $crate::api::condition::ReasonSet>::DOCS,
            ); )?
            fn as_str(self) -> &'static str {
                match self {
                    $( Self::$R => stringify!($R), )*
                    $( Self::Of(r) => <$Inner as $crate::api::condition::ReasonSet>::as_str(r), )?
                }
            }
        }

        $(
            impl From<$Inner> for $Set {
                fn from(r: $Inner) -> Self {
                    Self::Of(r)
                }
            }
        )?
    };
}
pub(crate) use reasons;

/// Declares a kind's condition types besides `Ready`: per type, its gate on Ready ([`Gate`]'s variant name), its
/// reasons ([`reasons!`]), and `ALL`, the list its CRD's description is generated from.
macro_rules! conditions {
    (for $Status:ty; $(
        $(#[doc = $doc:literal])*
        $Type:ident: $gate:ident { $($body:tt)* } $(+ $Inner:ident)?
    )*) => {
        $(
            $crate::api::condition::reasons! { $(#[doc = $doc])* pub enum $Type { $($body)* } $(+ $Inner)? }

            impl $crate::api::condition::Reason for $Type {
                const TYPE: &'static str = stringify!($Type);
                const GATE: $crate::api::condition::Gate = $crate::api::condition::Gate::$gate;
                type Status = $Status;
            }
        )*

        /// Every condition type besides `Ready`, in the order the CRD's description lists them.
        pub const ALL: &[$crate::api::condition::ConditionDoc] =
            &[$( $crate::api::condition::ConditionDoc::of::<$Type>() ),*];
    };
}
pub(crate) use conditions;

reasons! {
    /// The reasons of `Ready` besides those of the condition that holds it back.
    pub enum ReadyReason {
        /// Everything the spec asks for is in place.
        Reconciled,
        /// The spec is invalid; the message names each field and the fix. Nothing is applied until the spec changes.
        InvalidSpec,
        /// The API server refused a write; the message names the object and the server's answer. Retried with
        /// backoff.
        ApplyFailed,
        /// An object of a child's name exists that crmguard does not own; crmguard does not take it over: rename or
        /// delete it.
        NameConflict,
    }
}

reasons! {
    /// The reasons of the Events every kind's controller records.
    pub enum ReconcileEvent {
        /// A reconcile failed; the note says which category (e.g. `apiserver`, `forbidden`, `conflict`) and why.
        /// Retried with backoff; repeats fold into one Event series.
        ReconcileFailed,
    }
}

reasons! {
    /// Why Vault could not be used:
    pub enum VaultFailure {
        /// The operator has no Vault address: set vault.address in the Helm values (--vault-addr).
        VaultAddressMissing,
        /// Vault is sealed: unseal it.
        VaultSealed,
        /// Vault did not answer (network, DNS or TLS).
        VaultUnreachable,
        /// Vault refused the operator's login or request: check the operator's Vault role and policy.
        VaultPermissionDenied,
        /// Vault answered a request with an error or with something unreadable.
        VaultRequestFailed,
    }
}

fn lower_first(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_lowercase().chain(c).collect()).unwrap_or_default()
}

/// The description of a kind's `status.conditions` for its CRD (`kubectl explain <kind>.status.conditions`).
pub fn describe(all: &[ConditionDoc]) -> String {
    fn text(lines: &[&str]) -> String {
        lines.iter().map(|l| l.trim()).collect::<Vec<_>>().join(" ")
    }
    fn list(reasons: &[Described]) -> String {
        reasons.iter().map(|r| format!("`{}`: {}", r.name, text(r.doc))).collect::<Vec<_>>().join(" ")
    }
    let mut out = format!(
        "Conditions, one per type. `Ready`: True when everything the spec asks for is in place, else False with the \
         reason of a condition below that holds it back, or one of these. {}",
        list(<ReadyReason as ReasonSet>::DOCS)
    );
    for c in all {
        out.push_str(&format!("\n`{}` ({}): {} Reasons: {}", c.type_, c.gate.describe(), text(c.doc), list(c.reasons)));
        let (summary, more) = c.more;
        if !more.is_empty() {
            out.push_str(&format!(" And {} {}", lower_first(&text(summary)), list(more)));
        }
    }
    out
}

/// Condition status values as the API spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    True,
    False,
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }
}

impl From<bool> for Status {
    fn from(b: bool) -> Self {
        if b { Status::True } else { Status::False }
    }
}

/// Builds a condition. `now` is injected so callers (and tests) control time.
pub fn new_condition(
    type_: &str,
    status: Status,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: &Time,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: status.as_str().to_string(),
        reason: reason.to_string(),
        message: message.into(),
        observed_generation,
        last_transition_time: now.clone(),
    }
}

/// Inserts or updates `new` in `conditions` (a list keyed by `type`), keeping the previous
/// `lastTransitionTime` when the status did not change. Returns true when anything changed.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            if existing.status == new.status {
                new.last_transition_time = existing.last_transition_time.clone();
            }
            if *existing == new {
                return false;
            }
            *existing = new;
            true
        }
        None => {
            conditions.push(new);
            true
        }
    }
}

/// Finds a condition by type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let mut conds = vec![];
        assert!(set_condition(&mut conds, new_condition(READY, Status::False, "A", "m", Some(1), &t(10))));
        // same status, new message: updated, time kept
        assert!(set_condition(&mut conds, new_condition(READY, Status::False, "B", "m2", Some(2), &t(20))));
        assert_eq!(conds[0].last_transition_time, t(10));
        assert_eq!(conds[0].reason, "B");
        // identical apart from time: no change
        assert!(!set_condition(&mut conds, new_condition(READY, Status::False, "B", "m2", Some(2), &t(30))));
        // flip: time moves
        assert!(set_condition(&mut conds, new_condition(READY, Status::True, "C", "ok", Some(2), &t(40))));
        assert_eq!(conds[0].last_transition_time, t(40));
        assert_eq!(conds.len(), 1);
    }
}
