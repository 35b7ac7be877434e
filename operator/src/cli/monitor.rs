//! `crmguard monitor replay`: a database's log (as `kubectl logs --timestamps` prints it) through an AccessMonitor's
//! pipeline without a cluster: parsed, attributed, checked against the monitor's rules, and the access records
//! chained into an audit directory, exactly as the operator does at every read. For a rule change tried on
//! yesterday's log, and for the benchmark (`bench/monitor.sh`). The log is read in batches, so memory stays bounded
//! whatever its size.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use crate::api::AccessMonitor;
use crate::api::access_monitor::MonitoredEngine;
use crate::audit::{self, AccessRecord};
use crate::monitor::access::{self, Access};
use crate::monitor::attribution::{Identities, TeamUsers};
use crate::monitor::rules::{self, Minute, Rules};

/// Lines per batch (about what one read of a busy database's log brings).
pub const BATCH: usize = 20_000;

/// `crmguard monitor ...`.
#[derive(clap::Subcommand, Debug)]
pub enum MonitorCommand {
    /// Run a database's log through an AccessMonitor's rules offline: accesses, findings, the access records.
    Replay(ReplayArgs),
}

#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    /// The AccessMonitor (YAML or JSON file): its engine, identities and rules are used.
    #[arg(short = 'f', long = "filename")]
    pub monitor: PathBuf,
    /// The database's log with the kubelet's timestamps (`kubectl logs --timestamps <pod>`); `-` for stdin.
    #[arg(long)]
    pub log: PathBuf,
    /// A team's database user, as `<accesspolicy>/<team>=<user>` (repeatable): what the team's Secret records.
    #[arg(long = "team-user")]
    pub team_users: Vec<String>,
    /// AccessPolicy files whose grants the teams hold.
    #[arg(long = "policy")]
    pub policies: Vec<PathBuf>,
    /// Write the access records as a hash-chained stream into this directory (`<dir>/crmguard-audit/replay-access/`).
    #[arg(long)]
    pub audit_dir: Option<PathBuf>,
    /// Print every finding (default: the count per rule).
    #[arg(long)]
    pub findings: bool,
}

/// Runs the replay.
pub fn replay(a: ReplayArgs) -> Result<ExitCode, String> {
    let docs = crate::document::load(std::slice::from_ref(&a.monitor)).map_err(|e| e.to_string())?;
    let doc = docs.iter().find(|d| d.value["kind"] == "AccessMonitor").ok_or("the file holds no AccessMonitor")?;
    let m: AccessMonitor = serde_json::from_value(doc.value.clone()).map_err(|e| format!("AccessMonitor: {e}"))?;
    let mut errors = vec![];
    let rules = Rules::parse(&m.spec.rules, &mut errors);
    if !errors.is_empty() {
        return Err(errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "));
    }
    let policies: Vec<crate::api::AccessPolicy> = crate::document::load(&a.policies)
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|d| d.value["kind"] == "AccessPolicy")
        .map(|d| serde_json::from_value(d.value).map_err(|e| format!("AccessPolicy: {e}")))
        .collect::<Result<_, _>>()?;
    let mut teams: Vec<TeamUsers> = Vec::new();
    for t in &a.team_users {
        let (who, user) = t.split_once('=').ok_or(format!("--team-user {t}: write <accesspolicy>/<team>=<user>"))?;
        let (policy, team) =
            who.split_once('/').ok_or(format!("--team-user {t}: write <accesspolicy>/<team>=<user>"))?;
        teams.push(TeamUsers { policy: policy.into(), team: team.into(), users: vec![user.into()] });
    }
    let ids = Identities::build(&policies, &teams, &m.spec.identities, &Identities::default(), jiff::Timestamp::now());
    let input: Box<dyn std::io::Read> = if a.log.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(std::fs::File::open(&a.log).map_err(|e| format!("{}: {e}", a.log.display()))?)
    };
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| format!("tokio: {e}"))?;
    let store = a.audit_dir.as_ref().map(crate::backup::store::Store::dir);
    let (prefix, stream) = ("crmguard-audit", audit::access_stream("replay"));
    let (mut seq, mut prev) = match &store {
        Some(s) => runtime.block_on(audit::head(s, prefix, &stream)).map_err(|e| e.to_string())?,
        None => (0, audit::GENESIS.to_string()),
    };
    let started = Instant::now();
    let mut minute = Minute::default();
    let mut baseline = crate::monitor::baseline::Baseline::default();
    // Sessions and their client addresses, across batches (no cluster: addresses are not placed at pods).
    let mut sessions = crate::monitor::sessions::Sessions::default();
    let (mut lines, mut accesses, mut records) = (0u64, 0u64, 0u64);
    let mut found_by: BTreeMap<String, u64> = BTreeMap::new();
    let mut batch = String::new();
    let mut n = 0;
    let mut reader = BufReader::with_capacity(1 << 20, input);
    let monitor = m.metadata.name.clone().unwrap_or_default();
    let namespace = m.metadata.namespace.clone().unwrap_or_default();
    loop {
        let mut line = String::new();
        let read = reader.read_line(&mut line).map_err(|e| format!("{}: {e}", a.log.display()))?;
        // A batch ends at a line that starts a record (PostgreSQL continues a statement on the lines that follow).
        let ends = read == 0 || (n >= BATCH && starts_record(&line));
        if ends && !batch.is_empty() {
            let timed = access::timed(&batch);
            let mut got: Vec<Access> = match m.spec.database.engine {
                MonitoredEngine::Postgres => access::postgres(&timed, &mut sessions),
                MonitoredEngine::Mysql => access::mariadb(&timed),
            };
            crate::monitor::attribution::mask_unknown_logins(&mut got, &ids);
            let mut found = rules::check(&rules, &ids, &got, &mut minute);
            if let Some(settings) = &rules.baseline {
                found = rules::with_baseline(found, &mut baseline, settings, &ids, &got);
            }
            rules::volume_origins(&mut found, &got);
            for f in &found {
                *found_by.entry(format!("{:?}", f.rule)).or_default() += 1;
                if a.findings {
                    println!("{} {:?} {}: {}", f.at, f.rule, f.user, f.message);
                }
            }
            let out: Vec<AccessRecord> = rules::access_records(&namespace, &monitor, &ids, &got, &found);
            let bytes = audit::encode(&stream, seq + 1, &prev, &out);
            if let Some(s) = &store {
                let key = audit::segment_key(prefix, &stream, seq + 1);
                runtime.block_on(s.put(&key, bytes::Bytes::from(bytes.clone()))).map_err(|e| e.to_string())?;
            }
            seq += 1;
            prev = audit::segment_hash(&bytes);
            accesses += got.len() as u64;
            records += out.len() as u64;
            batch.clear();
            n = 0;
        }
        if read == 0 {
            break;
        }
        lines += 1;
        n += 1;
        batch.push_str(&line);
    }
    let secs = started.elapsed().as_secs_f64();
    let found: Vec<String> = found_by.iter().map(|(r, n)| format!("{r} {n}")).collect();
    println!(
        "{lines} line(s), {accesses} access(es), {records} record(s) in {seq} segment(s); findings: {}; {secs:.3} s, \
         {:.0} lines/s",
        if found.is_empty() { "none".to_string() } else { found.join(", ") },
        lines as f64 / secs.max(1e-9)
    );
    Ok(ExitCode::SUCCESS)
}

/// Whether a line (behind the kubelet's time) starts a record of PostgreSQL's log; MariaDB's lines all do.
fn starts_record(line: &str) -> bool {
    let text = line.split_once(' ').map_or("", |(_, t)| t);
    !text.starts_with('\t')
}
