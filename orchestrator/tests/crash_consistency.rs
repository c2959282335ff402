//! Crash consistency: keeld is `kill -9`ed at a random point of a burst of
//! mutating calls (creates, start, stop, force-off, delete to the recycle
//! bin, purge, an image import), started again on the same data dir, and,
//! once it has settled, everything must add up:
//!
//! 1. every operation that was answered 2xx still exists and has ended, and
//!    its outcome matches what happened (only where that is unambiguous:
//!    no other request of the burst touched the resource);
//! 2. nothing is left in a transitional status (`creating`, `starting`,
//!    `stopping`, an image `importing`, a disk `creating`, an operation
//!    `running`);
//! 3. every live keel-vmm under this keeld's data dir serves a VM that
//!    exists and is `running` or `paused`, and no VM has two;
//! 4. every `running` VM has exactly one live keel-vmm, the one it records;
//! 5. disk records and `<data>/disks/<id>.raw` files are the same set, and
//!    every VM's disks exist;
//! 6. no image is `importing`, and `<data>/images/` holds no file of an
//!    image that has no record, nor a partial import's bytes.
//!
//! `KEEL_CRASH_ROUNDS` (default 6) rounds; `KEEL_CRASH_SEED` (decimal or
//! 0x-hex) replays a run's random choices (the seed is printed);
//! `KEEL_CRASH_SETTLE_SECS` (default 60) bounds the wait for keeld to
//! settle; `KEEL_CRASH_KEEP_GOING=1` runs every round and reports all
//! violations at the end instead of stopping at the first round with any;
//! `KEEL_CRASH_KILL_MS` fixes the kill's delay (a large one, such as 15000,
//! lets every operation end before the kill: a check of the checks).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Keeld, op_outcome};
use keel_api::keeld_client::{KeeldClient, KeeldError};
use serde_json::{Value, json};

/// VMs (live and in the recycle bin) the test lets exist at once.
const VM_CAP: usize = 8;
/// The size of each round's image import.
const IMPORT_BYTES: usize = 16 << 20;
/// The latest point after the burst's start at which keeld is killed.
const MAX_KILL_MS: u64 = 400;

// ---------------------------------------------------------------------------
// A tiny deterministic PRNG (splitmix64): no new crates.

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            None
        } else {
            Some(&items[self.below(items.len() as u64) as usize])
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={v:?} is not a number")))
}

// ---------------------------------------------------------------------------
// The burst.

#[derive(Clone, Copy, Debug, PartialEq)]
enum Action {
    Create { start: bool, data_disk: bool },
    Start,
    Stop,
    ForceOff,
    Delete,
    Purge,
    Import,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Create { .. } => "vm.create",
            Action::Start => "vm.start",
            Action::Stop => "vm.stop",
            Action::ForceOff => "vm.force-off",
            Action::Delete => "vm.delete",
            Action::Purge => "vm.purge",
            Action::Import => "image.import",
        }
    }
}

#[derive(Clone, Debug)]
enum Target {
    None,
    /// A VM that existed when the round began.
    Existing(String),
    /// The VM made by an earlier create of the same burst (its index).
    Created(usize),
}

struct Planned {
    action: Action,
    target: Target,
    /// A VM's or image's name, for creates and imports.
    name: String,
    /// Pause before sending it.
    gap_ms: u64,
}

#[derive(Clone, Debug)]
enum Outcome {
    /// 2xx; the operation's id (if the answer had one) and the resource's.
    Accepted {
        status: u16,
        op: Option<String>,
        resource: Option<String>,
    },
    /// 4xx/5xx: keeld refused it; nothing changed.
    Refused { status: u16, error: String },
    /// Never reached keeld (killed already, or its target is unknown).
    NotSent(String),
    /// Sent, but the answer was lost to the kill: it may or may not have
    /// been done.
    Lost(String),
}

struct Sent {
    action: Action,
    method: &'static str,
    path: String,
    name: String,
    /// The VM it acts on (known before sending, or from a create's answer).
    vm: Option<String>,
    outcome: Outcome,
    /// The answer's body (a create's VM, with its system disk).
    body: Value,
    at_ms: u128,
}

impl Sent {
    fn accepted(&self) -> bool {
        matches!(self.outcome, Outcome::Accepted { .. })
    }
    fn lost(&self) -> bool {
        matches!(self.outcome, Outcome::Lost(_))
    }
    fn describe(&self) -> String {
        let what = match self.action {
            Action::Create { start, data_disk } => format!(
                " [{} start={start}{}]",
                self.name,
                if data_disk { " +data disk" } else { "" }
            ),
            Action::Import => format!(" [{}]", self.name),
            _ => String::new(),
        };
        format!("{} {}{what}", self.method, self.path)
    }
}

fn plan_burst(rng: &mut Rng, round: usize, before: &Snapshot) -> Vec<Planned> {
    let live: Vec<String> = before
        .vms
        .iter()
        .filter(|(_, vm)| !deleted(vm))
        .map(|(id, _)| id.clone())
        .collect();
    let all: Vec<String> = before.vms.keys().cloned().collect();
    let mut vm_count = before.vms.len();
    let n = 8 + rng.below(5) as usize;
    let import_at = rng.below(n as u64) as usize;
    let mut plan: Vec<Planned> = Vec::new();
    let mut targeted: BTreeSet<String> = BTreeSet::new();
    let mut creates: Vec<usize> = Vec::new();
    // Prefer VMs no earlier request of the burst touched, so that most
    // outcomes can be checked without ambiguity; sometimes pile on.
    let mut choose = |rng: &mut Rng, pool: &[String], creates: &[usize]| -> Target {
        if !creates.is_empty() && rng.chance(20) {
            return Target::Created(*rng.pick(creates).unwrap());
        }
        let fresh: Vec<String> = pool
            .iter()
            .filter(|id| !targeted.contains(*id))
            .cloned()
            .collect();
        let from = if !fresh.is_empty() && rng.chance(80) {
            &fresh[..]
        } else {
            pool
        };
        match rng.pick(from) {
            Some(id) => {
                targeted.insert(id.clone());
                Target::Existing(id.clone())
            }
            None => match rng.pick(creates) {
                Some(&i) => Target::Created(i),
                None => Target::None,
            },
        }
    };
    for i in 0..n {
        let gap_ms = rng.below(15);
        if i == import_at {
            plan.push(Planned {
                action: Action::Import,
                target: Target::None,
                name: format!("imp-r{round}"),
                gap_ms,
            });
            continue;
        }
        let mut action = match rng.below(14) {
            0..=2 => Action::Create {
                start: true,
                data_disk: rng.chance(30),
            },
            3 => Action::Create {
                start: false,
                data_disk: rng.chance(30),
            },
            4..=5 => Action::Start,
            6..=7 => Action::Stop,
            8..=9 => Action::ForceOff,
            10..=11 => Action::Delete,
            _ => Action::Purge,
        };
        if matches!(action, Action::Create { .. }) && vm_count >= VM_CAP {
            action = Action::Purge;
        }
        let target = match action {
            Action::Create { .. } => {
                vm_count += 1;
                creates.push(plan.len());
                Target::None
            }
            Action::Purge => choose(rng, &all, &creates),
            _ => choose(rng, &live, &creates),
        };
        if matches!(target, Target::None) && !matches!(action, Action::Create { .. }) {
            // Nothing to act on yet: make something instead.
            vm_count += 1;
            creates.push(plan.len());
            action = Action::Create {
                start: true,
                data_disk: false,
            };
        }
        plan.push(Planned {
            action,
            target,
            name: format!("r{round}-v{i}"),
            gap_ms,
        });
    }
    plan
}

/// Sends the burst, one request after the other without waiting for the
/// operations, until `killed` is set.
fn send_burst(
    client: KeeldClient,
    plan: Vec<Planned>,
    import_file: PathBuf,
    killed: Arc<AtomicBool>,
    start: Instant,
) -> Vec<Sent> {
    let mut sent: Vec<Sent> = Vec::new();
    let created_names: Vec<String> = plan.iter().map(|p| p.name.clone()).collect();
    for p in plan {
        std::thread::sleep(Duration::from_millis(p.gap_ms));
        let vm = match &p.target {
            Target::None => None,
            Target::Existing(id) => Some(id.clone()),
            Target::Created(i) => match &sent[*i].outcome {
                Outcome::Accepted {
                    resource: Some(id), ..
                } => Some(id.clone()),
                _ => None,
            },
        };
        let (method, path, body) = match p.action {
            Action::Create { start, data_disk } => {
                let mut body = json!({"name": p.name, "image": "tiny", "vcpus": 1,
                                      "memory_mib": 64, "start": start});
                if data_disk {
                    body["data_disks"] = json!([{"size_gib": 1}]);
                }
                ("POST", "/api/v1/vms".to_string(), Some(body))
            }
            Action::Import => (
                "POST",
                "/api/v1/images".to_string(),
                Some(json!({"name": p.name, "source": {"path": import_file}})),
            ),
            a => {
                // Not sent when its create was not accepted; named so for the log.
                let id = vm.clone().unwrap_or_else(|| match &p.target {
                    Target::Created(i) => format!("<{}>", created_names[*i]),
                    _ => "<none>".into(),
                });
                match a {
                    Action::Start => ("POST", format!("/api/v1/vms/{id}/start"), Some(json!({}))),
                    Action::Stop => ("POST", format!("/api/v1/vms/{id}/stop"), Some(json!({}))),
                    Action::ForceOff => (
                        "POST",
                        format!("/api/v1/vms/{id}/force-off"),
                        Some(json!({})),
                    ),
                    Action::Delete => ("DELETE", format!("/api/v1/vms/{id}"), None),
                    _ => ("DELETE", format!("/api/v1/vms/{id}?purge=true"), None),
                }
            }
        };
        let needs_vm = !matches!(p.action, Action::Create { .. } | Action::Import);
        let at_ms = start.elapsed().as_millis();
        let (outcome, reply_body) = if killed.load(Ordering::SeqCst) {
            (
                Outcome::NotSent("keeld was killed already".into()),
                Value::Null,
            )
        } else if needs_vm && vm.is_none() {
            (
                Outcome::NotSent("its target's create was not accepted".into()),
                Value::Null,
            )
        } else {
            match client.send(method, &path, body.as_ref(), &[]) {
                Ok(r) if (200..300).contains(&r.status) => {
                    let op = r.body["operation"]["id"].as_str().map(str::to_string);
                    let resource = r.body["vm"]["id"]
                        .as_str()
                        .or(r.body["image"]["id"].as_str())
                        .map(str::to_string);
                    (
                        Outcome::Accepted {
                            status: r.status,
                            op,
                            resource,
                        },
                        r.body,
                    )
                }
                Ok(r) => (
                    Outcome::Refused {
                        status: r.status,
                        error: r.body["error"]
                            .as_str()
                            .map(str::to_string)
                            .unwrap_or(r.text),
                    },
                    Value::Null,
                ),
                Err(e @ KeeldError::Connect { .. }) => {
                    (Outcome::NotSent(e.to_string()), Value::Null)
                }
                Err(e) => (Outcome::Lost(e.to_string()), Value::Null),
            }
        };
        let vm = match (&p.action, &outcome) {
            (Action::Create { .. }, Outcome::Accepted { resource, .. }) => resource.clone(),
            (Action::Create { .. } | Action::Import, _) => None,
            _ => vm,
        };
        sent.push(Sent {
            action: p.action,
            method,
            path,
            name: p.name,
            vm,
            outcome,
            body: reply_body,
            at_ms,
        });
    }
    sent
}

// ---------------------------------------------------------------------------
// What keeld says and what is on the host.

struct Proc {
    pid: i32,
    /// The VM whose directory its command line names.
    vm: Option<String>,
    cmdline: String,
}

#[derive(Default)]
struct Snapshot {
    vms: BTreeMap<String, Value>,
    disks: BTreeMap<String, Value>,
    images: BTreeMap<String, Value>,
    ops: BTreeMap<String, Value>,
    procs: Vec<Proc>,
    disk_files: BTreeSet<String>,
    image_files: BTreeMap<String, u64>,
    vm_dirs: BTreeSet<String>,
}

fn get_json(client: &KeeldClient, path: &str) -> Result<Value, String> {
    match client.send("GET", path, None, &[]) {
        Ok(r) if r.status == 200 => Ok(r.body),
        Ok(r) => Err(format!("GET {path}: {} {}", r.status, r.text)),
        Err(e) => Err(format!("GET {path}: {e}")),
    }
}

fn items(v: &Value) -> Vec<Value> {
    v.get("items")
        .and_then(Value::as_array)
        .or(v.as_array())
        .cloned()
        .unwrap_or_default()
}

fn by_id(into: &mut BTreeMap<String, Value>, list: Vec<Value>) {
    for item in list {
        if let Some(id) = item["id"].as_str() {
            into.insert(id.to_string(), item);
        }
    }
}

fn deleted(vm: &Value) -> bool {
    !vm["deleted_at"].is_null()
}

fn status(vm: &Value) -> &str {
    vm["status"].as_str().unwrap_or("?")
}

/// The live (non-zombie) keel-vmm processes of this keeld: those whose
/// command line, working directory or open files point into `data`. Each
/// comes with the VM directory (`<data>/vms/<id>/`) they name: keeld gives
/// keel-vmm `--event-monitor path=<data>/vms/<id>/events.jsonl`, and the
/// VMM holds files of that directory open (its log, its serial output).
fn vmm_processes(data: &Path) -> Vec<Proc> {
    let vms_dir = format!("{}/vms/", data.display());
    let data = data.display().to_string();
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'));
        let cmd = String::from_utf8_lossy(&raw);
        let args: Vec<&str> = cmd.split('\0').filter(|a| !a.is_empty()).collect();
        let Some(argv0) = args.first() else { continue };
        if zombie || !argv0.ends_with("keel-vmm") {
            continue;
        }
        // Where it points: its arguments first, then its working directory
        // and open files.
        let mut places: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let link = |p: PathBuf| std::fs::read_link(p).ok().map(|t| t.display().to_string());
        places.extend(link(PathBuf::from(format!("/proc/{pid}/cwd"))));
        if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
            places.extend(fds.flatten().filter_map(|fd| link(fd.path())));
        }
        if !places.iter().any(|p| p.contains(&data)) {
            continue;
        }
        let vm = places.iter().find_map(|a| {
            let at = a.find(&vms_dir)?;
            let rest = &a[at + vms_dir.len()..];
            let id = rest.split('/').next()?;
            (!id.is_empty()).then(|| id.to_string())
        });
        out.push(Proc {
            pid,
            vm,
            cmdline: args.join(" "),
        });
    }
    out.sort_by_key(|p| p.pid);
    out
}

fn fetch(k: &Keeld) -> Result<Snapshot, String> {
    let c = &k.admin;
    let mut s = Snapshot::default();
    let projects: Vec<String> = items(&get_json(c, "/api/v1/projects")?)
        .iter()
        .filter_map(|p| p["id"].as_str().map(str::to_string))
        .collect();
    if projects.is_empty() {
        return Err("GET /api/v1/projects lists no project".into());
    }
    for p in &projects {
        for deleted in [false, true] {
            let list = get_json(
                c,
                &format!("/api/v1/vms?project={p}&deleted={deleted}&limit=1000"),
            )?;
            by_id(&mut s.vms, items(&list));
        }
        by_id(
            &mut s.disks,
            items(&get_json(c, &format!("/api/v1/disks?project={p}"))?),
        );
        by_id(
            &mut s.images,
            items(&get_json(c, &format!("/api/v1/images?project={p}"))?),
        );
        by_id(
            &mut s.ops,
            items(&get_json(c, &format!("/api/v1/operations?project={p}"))?),
        );
    }
    let data = k.dir.join("data");
    s.procs = vmm_processes(&data);
    let names = |dir: &Path| -> Vec<(String, u64, bool)> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| {
                        let meta = e.metadata().ok();
                        (
                            e.file_name().to_string_lossy().into_owned(),
                            meta.as_ref().map(|m| m.len()).unwrap_or(0),
                            meta.is_some_and(|m| m.is_dir()),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    s.disk_files = names(&data.join("disks"))
        .into_iter()
        .map(|n| n.0)
        .collect();
    s.image_files = names(&data.join("images"))
        .into_iter()
        .map(|(n, len, _)| (n, len))
        .collect();
    s.vm_dirs = names(&data.join("vms"))
        .into_iter()
        .filter(|n| n.2)
        .map(|n| n.0)
        .collect();
    Ok(s)
}

// ---------------------------------------------------------------------------
// Violations.

#[derive(Clone, Debug)]
struct Violation {
    kind: &'static str,
    /// What it is about (kind and resource), to tell a lasting violation
    /// from a passing one and not to report one twice.
    key: String,
    msg: String,
}

fn violation(kind: &'static str, about: &str, msg: String) -> Violation {
    Violation {
        kind,
        key: format!("{kind}:{about}"),
        msg,
    }
}

/// What is still on its way somewhere (ignoring what was reported stuck
/// in an earlier round).
fn transitional(s: &Snapshot, ignore: &BTreeSet<String>) -> Vec<Violation> {
    let mut out = Vec::new();
    for (id, op) in &s.ops {
        if op["status"] == "running" {
            out.push(violation(
                "op-unfinished",
                id,
                format!(
                    "operation {id} ({} on {}) is still running",
                    op["action"].as_str().unwrap_or("?"),
                    op["target"].as_str().unwrap_or("?")
                ),
            ));
        }
    }
    for (id, vm) in &s.vms {
        if matches!(status(vm), "creating" | "starting" | "stopping") {
            out.push(violation(
                "stuck-vm",
                id,
                format!(
                    "VM {id} ({}) is stuck `{}` ({:?}){}",
                    vm["name"].as_str().unwrap_or("?"),
                    status(vm),
                    vm["status_reason"].as_str().unwrap_or(""),
                    if deleted(vm) {
                        " in the recycle bin"
                    } else {
                        ""
                    }
                ),
            ));
        }
    }
    for (id, img) in &s.images {
        if img["status"] == "importing" {
            out.push(violation(
                "stuck-image",
                id,
                format!(
                    "image {id} ({}) is stuck `importing` at {}% ({:?})",
                    img["name"].as_str().unwrap_or("?"),
                    img["progress"],
                    img["status_reason"].as_str().unwrap_or("")
                ),
            ));
        }
    }
    for (id, d) in &s.disks {
        if d["status"] == "creating" {
            out.push(violation(
                "stuck-disk",
                id,
                format!(
                    "disk {id} ({}) is stuck `creating`",
                    d["name"].as_str().unwrap_or("?")
                ),
            ));
        }
    }
    out.retain(|v| !ignore.contains(&v.key));
    out
}

/// Waits until nothing is transitional (twice in a row, 100 ms apart).
/// Returns how long it took, the last snapshot, and what is stuck if it
/// never settled.
fn settle(
    k: &Keeld,
    timeout: Duration,
    ignore: &BTreeSet<String>,
) -> (Duration, Snapshot, Vec<Violation>) {
    let start = Instant::now();
    let mut calm = 0;
    loop {
        let (stuck, snap) = match fetch(k) {
            Ok(s) => (transitional(&s, ignore), Some(s)),
            Err(e) => (
                vec![violation(
                    "keeld-unreachable",
                    "api",
                    format!("keeld does not answer: {e}"),
                )],
                None,
            ),
        };
        calm = if stuck.is_empty() && snap.is_some() {
            calm + 1
        } else {
            0
        };
        let settled = calm >= 2;
        if settled || start.elapsed() > timeout {
            let stuck = if settled { Vec::new() } else { stuck };
            return (start.elapsed(), snap.unwrap_or_default(), stuck);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn procs_of(s: &Snapshot, vm: &str) -> Vec<i32> {
    s.procs
        .iter()
        .filter(|p| p.vm.as_deref() == Some(vm))
        .map(|p| p.pid)
        .collect()
}

/// A VM's state in a few words, for messages.
fn vm_state(s: &Snapshot, id: &str) -> String {
    match s.vms.get(id) {
        None => "gone".into(),
        Some(vm) => {
            let pids = procs_of(s, id);
            format!(
                "`{}`{}{}",
                status(vm),
                if deleted(vm) {
                    " in the recycle bin"
                } else {
                    ""
                },
                if pids.is_empty() {
                    " with no keel-vmm".to_string()
                } else {
                    format!(" with keel-vmm pid {pids:?}")
                }
            )
        }
    }
}

/// Checks 1 and 3-6 of the module's list on a settled keeld.
fn check(k: &Keeld, before: &Snapshot, sent: &[Sent], after: &Snapshot) -> Vec<Violation> {
    let mut out = Vec::new();
    // Outcomes are judged by the records; a keel-vmm that should not be
    // there is checks 3 and 4's business (and reported once, there).
    let runs = |s: &Snapshot, id: &str| {
        s.vms
            .get(id)
            .is_some_and(|vm| matches!(status(vm), "running" | "paused"))
    };

    // 1. Accepted operations: they exist, they ended, and they tell the truth.
    let mut touched: BTreeMap<String, usize> = BTreeMap::new();
    let mut ambiguous: BTreeSet<String> = BTreeSet::new();
    let mut purges: BTreeMap<String, usize> = BTreeMap::new();
    let mut system_disk: BTreeMap<String, String> = BTreeMap::new();
    for (id, vm) in &before.vms {
        if let Some(d) = vm["system_disk"].as_str() {
            system_disk.insert(id.clone(), d.to_string());
        }
    }
    for s in sent {
        let Some(vm) = &s.vm else { continue };
        if s.accepted() {
            *touched.entry(vm.clone()).or_default() += 1;
        }
        if s.lost() {
            ambiguous.insert(vm.clone());
        }
        if s.action == Action::Purge && (s.accepted() || s.lost()) {
            *purges.entry(vm.clone()).or_default() += 1;
        }
        if let Some(d) = s.body["vm"]["system_disk"].as_str() {
            system_disk.insert(vm.clone(), d.to_string());
        }
    }
    let alone = |vm: &str| touched.get(vm) == Some(&1) && !ambiguous.contains(vm);
    for (i, s) in sent.iter().enumerate() {
        let Outcome::Accepted {
            status: code, op, ..
        } = &s.outcome
        else {
            continue;
        };
        let Some(op_id) = op else {
            out.push(violation(
                "op-missing",
                &s.path,
                format!("{} was answered {code} with no operation", s.describe()),
            ));
            continue;
        };
        let op = match after.ops.get(op_id) {
            Some(op) => op.clone(),
            None => match k
                .admin
                .send("GET", &format!("/api/v1/operations/{op_id}"), None, &[])
            {
                Ok(r) if r.status == 200 => r.body,
                Ok(r) => {
                    out.push(violation(
                        "op-lost",
                        op_id,
                        format!(
                            "{} was answered {code} with operation {op_id}, which keeld no \
                             longer knows (GET answers {})",
                            s.describe(),
                            r.status
                        ),
                    ));
                    continue;
                }
                Err(e) => {
                    out.push(violation(
                        "op-lost",
                        op_id,
                        format!("operation {op_id} of {}: {e}", s.describe()),
                    ));
                    continue;
                }
            },
        };
        let op_status = op["status"].as_str().unwrap_or("?");
        let error = op["error"].as_str().unwrap_or("");
        let head = format!("{} {op_id} ({})", s.action.name(), s.describe());
        match op_status {
            "succeeded" | "failed" => {}
            "running" => continue, // reported as unfinished by the settle wait
            other => {
                out.push(violation(
                    "op-unfinished",
                    op_id,
                    format!("{head} has status {other:?}"),
                ));
                continue;
            }
        }
        let ok = op_status == "succeeded";
        if s.action == Action::Import {
            let Some(img_id) = op["target"].as_str().or(s.body["image"]["id"].as_str()) else {
                continue;
            };
            let img = after.images.get(img_id);
            let ready = img.is_some_and(|i| i["status"] == "ready");
            if ok {
                let file = after.image_files.get(&format!("{img_id}.raw")).copied();
                let size = img.and_then(|i| i["size"].as_u64());
                if !ready || size != Some(IMPORT_BYTES as u64) || file != Some(IMPORT_BYTES as u64)
                {
                    out.push(violation(
                        "op-outcome",
                        op_id,
                        format!(
                            "{head} succeeded but image {img_id} is {} (size {size:?}; \
                             {img_id}.raw: {file:?} bytes; {IMPORT_BYTES} expected)",
                            img.map(|i| format!("`{}`", i["status"].as_str().unwrap_or("?")))
                                .unwrap_or_else(|| "gone".into())
                        ),
                    ));
                }
            } else if ready {
                out.push(violation(
                    "op-outcome",
                    op_id,
                    format!("{head} is marked failed ({error:?}) though image {img_id} is `ready`"),
                ));
            }
            continue;
        }
        let Some(vm) = s.vm.as_deref() else { continue };
        let now = vm_state(after, vm);
        let rec = after.vms.get(vm);
        let was = before.vms.get(vm);
        match s.action {
            Action::Create { start, .. } => {
                if ok {
                    if rec.is_none() && !purges.contains_key(vm) {
                        out.push(violation(
                            "op-outcome",
                            op_id,
                            format!("{head} succeeded but VM {vm} is gone (nothing purged it)"),
                        ));
                    }
                    let want = if start { "running" } else { "stopped" };
                    if alone(vm)
                        && let Some(r) = rec
                        && (status(r) != want || deleted(r))
                    {
                        out.push(violation(
                            "op-outcome",
                            op_id,
                            format!(
                                "{head} succeeded but VM {vm} is {now}, not `{want}` (no other \
                                 request touched it)"
                            ),
                        ));
                    }
                } else if alone(vm) && runs(after, vm) {
                    out.push(violation(
                        "op-outcome",
                        op_id,
                        format!(
                            "{head} is marked failed ({error:?}) though VM {vm} is {now} (no \
                             other request touched it)"
                        ),
                    ));
                }
            }
            Action::Start => {
                if !alone(vm) {
                    continue;
                }
                if ok && !rec.is_some_and(|r| status(r) == "running" && !deleted(r)) {
                    out.push(violation(
                        "op-outcome",
                        op_id,
                        format!(
                            "{head} succeeded but VM {vm} is {now} (no other request touched it)"
                        ),
                    ));
                }
                let was_stopped = was.is_some_and(|w| status(w) == "stopped" && !deleted(w));
                if !ok && was_stopped && runs(after, vm) {
                    out.push(violation(
                        "op-outcome",
                        op_id,
                        format!(
                            "{head} is marked failed ({error:?}) though VM {vm}, stopped before, \
                             is {now} (no other request touched it)"
                        ),
                    ));
                }
            }
            Action::Stop | Action::ForceOff => {
                if !alone(vm) {
                    continue;
                }
                // A VM in `error` may stay so once its (dead) VMM is
                // cleared: its reason is worth keeping.
                let stopped = rec.is_some_and(|r| status(r) == "stopped");
                let off = rec.is_some_and(|r| matches!(status(r), "stopped" | "error"));
                if ok && !off {
                    out.push(violation(
                        "op-outcome",
                        op_id,
                        format!(
                            "{head} succeeded but VM {vm} is {now} (no other request touched it)"
                        ),
                    ));
                }
                let was_running = was.is_some_and(|w| status(w) == "running");
                if !ok && was_running && stopped {
                    out.push(violation(
                        "op-outcome",
                        op_id,
                        format!(
                            "{head} is marked failed ({error:?}) though VM {vm}, running before, \
                             is {now} (no other request touched it)"
                        ),
                    ));
                }
            }
            Action::Delete => {
                if ok && !purges.contains_key(vm) {
                    let binned = rec.is_some_and(|r| deleted(r) && status(r) == "stopped");
                    if !binned {
                        let started_after = sent[i + 1..].iter().any(|l| {
                            l.action == Action::Start && l.vm.as_deref() == Some(vm) && l.accepted()
                        });
                        out.push(violation(
                            "op-outcome",
                            op_id,
                            format!(
                                "{head} succeeded but VM {vm} is {now}, not stopped in the \
                                 recycle bin (nothing purged it){}",
                                if started_after {
                                    "; a start of it was accepted after the delete (the \
                                     VM is not in the bin until its stop ends) and ran \
                                     after it: not a crash's doing"
                                } else {
                                    ""
                                }
                            ),
                        ));
                    }
                } else if !ok && alone(vm) && rec.is_some_and(deleted) {
                    out.push(violation(
                        "op-outcome",
                        op_id,
                        format!(
                            "{head} is marked failed ({error:?}) though VM {vm} is {now} (no \
                             other request touched it)"
                        ),
                    ));
                }
            }
            Action::Purge => {
                if ok {
                    let mut left = Vec::new();
                    if rec.is_some() {
                        left.push(format!("the VM ({now})"));
                    }
                    if let Some(d) = system_disk.get(vm) {
                        if after.disks.contains_key(d) {
                            left.push(format!("its system disk record {d}"));
                        }
                        if after.disk_files.contains(&format!("{d}.raw")) {
                            left.push(format!("its system disk file {d}.raw"));
                        }
                    }
                    if after.vm_dirs.contains(vm) {
                        left.push(format!("its directory vms/{vm}"));
                    }
                    if !left.is_empty() {
                        out.push(violation(
                            "op-outcome",
                            op_id,
                            format!("{head} succeeded but left {}", left.join(", ")),
                        ));
                    }
                } else if purges.get(vm) == Some(&1) && rec.is_none() {
                    out.push(violation(
                        "op-outcome",
                        op_id,
                        format!(
                            "{head} is marked failed ({error:?}) though VM {vm} is gone (no \
                             other purge of it was sent)"
                        ),
                    ));
                }
            }
            Action::Import => unreachable!(),
        }
    }

    // 3. keel-vmm processes: each serves a VM that exists and runs; one each.
    let mut per_vm: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    for p in &after.procs {
        let Some(vm) = p.vm.as_deref() else {
            out.push(violation(
                "orphan-vmm",
                &format!("pid{}", p.pid),
                format!(
                    "keel-vmm pid {} names no VM directory: {}",
                    p.pid, p.cmdline
                ),
            ));
            continue;
        };
        per_vm.entry(vm).or_default().push(p.pid);
        match after.vms.get(vm) {
            None => out.push(violation(
                "orphan-vmm",
                vm,
                format!(
                    "keel-vmm pid {} runs for VM {vm}, which does not exist",
                    p.pid
                ),
            )),
            // A VM on its way (reported as stuck if it stays so) has one.
            Some(rec) if matches!(status(rec), "starting" | "stopping") => {}
            // Running in the recycle bin: reported as `bin-running` below.
            Some(rec) if !matches!(status(rec), "running" | "paused") => out.push(violation(
                "orphan-vmm",
                vm,
                format!(
                    "keel-vmm pid {} runs for VM {vm} ({}), which is `{}`{} (records \
                         keel-vmm {})",
                    p.pid,
                    rec["name"].as_str().unwrap_or("?"),
                    status(rec),
                    if deleted(rec) {
                        " in the recycle bin"
                    } else {
                        ""
                    },
                    lock_pid(k, vm)
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| "none".into())
                ),
            )),
            Some(_) => {}
        }
    }
    for (vm, pids) in &per_vm {
        if pids.len() > 1 {
            out.push(violation(
                "dup-vmm",
                vm,
                format!(
                    "VM {vm} has {} keel-vmm processes: pids {pids:?}",
                    pids.len()
                ),
            ));
        }
    }

    // 4. Running VMs have their one keel-vmm; others record none.
    for (id, vm) in &after.vms {
        let pids = procs_of(after, id);
        // keel-vmm writes its pid into the lock it holds in the VM's dir.
        let recorded = lock_pid(k, id);
        let name = vm["name"].as_str().unwrap_or("?");
        if matches!(status(vm), "running" | "paused") {
            if deleted(vm) {
                out.push(violation(
                    "bin-running",
                    id,
                    format!(
                        "VM {id} ({name}) is in the recycle bin yet `{}` (keel-vmm pid {pids:?})",
                        status(vm)
                    ),
                ));
            }
            if pids.is_empty() {
                out.push(violation(
                    "running-without-vmm",
                    id,
                    format!(
                        "VM {id} ({name}) is `{}` but no keel-vmm runs for it (it records pid \
                         {recorded:?})",
                        status(vm)
                    ),
                ));
            } else if recorded.is_none_or(|r| !pids.contains(&(r as i32))) {
                out.push(violation(
                    "vmm-record",
                    id,
                    format!(
                        "VM {id} ({name}) records keel-vmm pid {recorded:?}, but its live \
                         keel-vmm is {pids:?}"
                    ),
                ));
            }
        }
    }

    // 5. Disk records and files.
    let mut disk_ids_on_disk = BTreeSet::new();
    for f in &after.disk_files {
        match f.strip_suffix(".raw") {
            Some(id) => {
                disk_ids_on_disk.insert(id.to_string());
            }
            None => out.push(violation(
                "disk-stray-file",
                f,
                format!("disks/{f} is not a disk's file (a leftover?)"),
            )),
        }
    }
    for (id, d) in &after.disks {
        if !disk_ids_on_disk.contains(id) {
            out.push(violation(
                "disk-record-without-file",
                id,
                format!(
                    "disk {id} ({}, `{}`, VM {}) has no file disks/{id}.raw",
                    d["name"].as_str().unwrap_or("?"),
                    d["status"].as_str().unwrap_or("?"),
                    d["vm"]
                ),
            ));
        }
        if let Some(vm) = d["vm"].as_str()
            && !after.vms.contains_key(vm)
        {
            out.push(violation(
                "disk-ref",
                id,
                format!(
                    "disk {id} ({}) is attached to VM {vm}, which does not exist",
                    d["name"].as_str().unwrap_or("?")
                ),
            ));
        }
    }
    for id in &disk_ids_on_disk {
        if !after.disks.contains_key(id) {
            out.push(violation(
                "disk-file-without-record",
                id,
                format!("disks/{id}.raw has no disk record"),
            ));
        }
    }
    for (id, vm) in &after.vms {
        let mut refs: Vec<&str> = vm["system_disk"].as_str().into_iter().collect();
        refs.extend(
            vm["disks"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str),
        );
        for d in refs {
            if !after.disks.contains_key(d) {
                out.push(violation(
                    "disk-ref",
                    &format!("{id}/{d}"),
                    format!(
                        "VM {id} ({}, {}) uses disk {d}, which has no record",
                        vm["name"].as_str().unwrap_or("?"),
                        vm_state(after, id)
                    ),
                ));
            }
        }
    }

    // 6. Images: their files belong to them; no partial bytes left over.
    for f in after.image_files.keys() {
        let (id, ext) = f.split_once('.').unwrap_or((f.as_str(), ""));
        match after.images.get(id) {
            None => out.push(violation(
                "image-orphan-file",
                f,
                format!("images/{f} belongs to no image record (a partial import left behind?)"),
            )),
            Some(img) => {
                let st = img["status"].as_str().unwrap_or("?");
                let leftover = match (st, ext) {
                    ("importing", _) => false,
                    (_, "partial" | "converting") => true,
                    ("error", "raw" | "spare" | "spare-copying") => true,
                    _ => false,
                };
                if leftover {
                    out.push(violation(
                        "image-leftover",
                        f,
                        format!(
                            "images/{f} is left beside image {id} ({}), which is `{st}`",
                            img["name"].as_str().unwrap_or("?")
                        ),
                    ));
                }
            }
        }
    }
    for (id, img) in &after.images {
        if img["status"] == "ready" && !after.image_files.contains_key(&format!("{id}.raw")) {
            out.push(violation(
                "image-leftover",
                id,
                format!(
                    "image {id} ({}) is `ready` but images/{id}.raw is missing",
                    img["name"].as_str().unwrap_or("?")
                ),
            ));
        }
    }

    // VM directories of VMs that no longer exist.
    for d in &after.vm_dirs {
        if !after.vms.contains_key(d) {
            out.push(violation(
                "vm-dir-orphan",
                d,
                format!("vms/{d} is left behind: no VM {d} exists"),
            ));
        }
    }
    out
}

fn count_kinds(vs: &[Violation]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for v in vs {
        *counts.entry(v.kind).or_default() += 1;
    }
    counts
        .iter()
        .map(|(k, n)| format!("{k}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Kills whatever keel-vmm is left, whether the test passes or panics
/// (the harness's own Drop runs after this and does it again).
struct Cleanup(Keeld);

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.0.kill9();
        let data = self.0.dir.join("data");
        for _ in 0..3 {
            let mut pids = self.0.vmm_pids();
            pids.extend(vmm_processes(&data).iter().map(|p| p.pid));
            pids.sort_unstable();
            pids.dedup();
            for pid in pids {
                // SAFETY: kill sends a signal to this test's own VMMs.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn keeld_killed_mid_burst_comes_back_consistent() {
    let rounds = env_u64("KEEL_CRASH_ROUNDS").unwrap_or(6) as usize;
    let seed = env_u64("KEEL_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let settle_for = Duration::from_secs(env_u64("KEEL_CRASH_SETTLE_SECS").unwrap_or(60));
    let keep_going = std::env::var("KEEL_CRASH_KEEP_GOING").is_ok_and(|v| v == "1");
    let fixed_kill_ms = env_u64("KEEL_CRASH_KILL_MS");
    println!(
        "crash consistency: seed {seed:#x} (KEEL_CRASH_SEED={seed:#x} replays it), {rounds} \
         rounds, settle wait {settle_for:?}{}",
        if keep_going { ", keep going" } else { "" }
    );
    let test_start = Instant::now();

    let mut h = Cleanup(Keeld::start("crash"));
    let k = &mut h.0;
    println!("data dir {}", k.dir.display());
    let image = k.tiny_image("tiny");
    assert_eq!(image["status"], "ready", "{image}");
    // Something to act on from the first round: one running, one stopped.
    for (name, start) in [("base-1", true), ("base-2", false)] {
        let vm = k.create_vm(
            &k.admin,
            json!({"name": name, "image": "tiny", "vcpus": 1, "memory_mib": 64, "start": start}),
        );
        assert_eq!(
            vm["status"],
            if start { "running" } else { "stopped" },
            "{vm}"
        );
    }
    let mut before = fetch(k).expect("keeld answers");

    let mut all: Vec<(usize, Violation)> = Vec::new();
    let mut reported: BTreeSet<String> = BTreeSet::new();
    for round in 1..=rounds {
        let mut rng = Rng(seed ^ (round as u64).wrapping_mul(0xa076_1d64_78bd_642f));
        let plan = plan_burst(&mut rng, round, &before);
        let kill_ms = rng.below(MAX_KILL_MS + 1);
        let kill_ms = fixed_kill_ms.unwrap_or(kill_ms);
        let import_file = k.import_dir().join(format!("src-r{round}.raw"));
        let pattern: Vec<u8> = (0..IMPORT_BYTES).map(|i| (i % 251) as u8 | 1).collect();
        std::fs::write(&import_file, &pattern).unwrap();
        println!(
            "\n=== round {round}/{rounds} (seed {seed:#x}): {} requests, kill -9 at {kill_ms} ms, \
             {} VMs before ===",
            plan.len(),
            before.vms.len()
        );

        let killed = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let burst = {
            let client = k.admin.clone();
            let killed = killed.clone();
            let file = import_file.clone();
            std::thread::spawn(move || send_burst(client, plan, file, killed, start))
        };
        let at = Duration::from_millis(kill_ms);
        if let Some(left) = at.checked_sub(start.elapsed()) {
            std::thread::sleep(left);
        }
        killed.store(true, Ordering::SeqCst);
        k.kill9();
        let killed_at = start.elapsed();
        let sent = burst.join().expect("the burst thread");
        for s in &sent {
            let result = match &s.outcome {
                Outcome::Accepted {
                    status,
                    op,
                    resource,
                } => format!(
                    "{status} {} ({})",
                    op.as_deref().unwrap_or("NO OPERATION"),
                    resource.as_deref().unwrap_or("?")
                ),
                Outcome::Refused { status, error } => format!("{status} {error}"),
                Outcome::NotSent(why) => format!("not sent: {why}"),
                Outcome::Lost(why) => format!("answer lost: {why}"),
            };
            println!("  +{:>4} ms {} → {result}", s.at_ms, s.describe());
        }
        println!("  killed at {} ms", killed_at.as_millis());

        let restart = Instant::now();
        k.spawn();
        let restarted = restart.elapsed();
        let ignore: BTreeSet<String> = if keep_going {
            reported.clone()
        } else {
            BTreeSet::new()
        };
        let (took, snap, stuck) = settle(k, settle_for, &ignore);
        if stuck.is_empty() {
            println!(
                "  restarted in {:.1} s, settled in {:.1} s",
                restarted.as_secs_f64(),
                took.as_secs_f64()
            );
        } else {
            println!(
                "  restarted in {:.1} s, NOT settled after {:.1} s",
                restarted.as_secs_f64(),
                took.as_secs_f64()
            );
        }
        // A violation must last: what a second look a second later no
        // longer shows was a moment between two steps, not a crash's mark.
        let first = check(k, &before, &sent, &snap);
        let (mut found, after) = if first.is_empty() {
            (Vec::new(), snap)
        } else {
            std::thread::sleep(Duration::from_secs(1));
            match fetch(k) {
                Ok(again) => {
                    let keys: BTreeSet<&String> = first.iter().map(|v| &v.key).collect();
                    let second = check(k, &before, &sent, &again);
                    (
                        second
                            .into_iter()
                            .filter(|v| keys.contains(&v.key))
                            .collect(),
                        again,
                    )
                }
                Err(e) => {
                    let mut f = first;
                    f.push(violation(
                        "keeld-unreachable",
                        "api",
                        format!("keeld does not answer: {e}"),
                    ));
                    (f, snap)
                }
            }
        };
        found.splice(0..0, stuck);
        let (new, repeated): (Vec<Violation>, Vec<Violation>) =
            found.into_iter().partition(|v| !reported.contains(&v.key));
        if new.is_empty() {
            println!(
                "  consistent{}",
                if repeated.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (besides {} violations seen in earlier rounds)",
                        repeated.len()
                    )
                }
            );
        } else {
            println!("  {} violations ({}):", new.len(), count_kinds(&new));
            for v in &new {
                println!("    [{}] {}", v.kind, v.msg);
            }
        }
        for v in &new {
            reported.insert(v.key.clone());
        }
        all.extend(new.into_iter().map(|v| (round, v)));
        let _ = std::fs::remove_file(&import_file);
        if !all.is_empty() && !keep_going {
            break;
        }
        before = after;
    }

    println!(
        "\ncrash consistency: {:.1} s in all",
        test_start.elapsed().as_secs_f64()
    );
    if !all.is_empty() {
        let vs: Vec<Violation> = all.iter().map(|(_, v)| v.clone()).collect();
        let mut msg = format!(
            "keeld is inconsistent after kill -9 ({} violations: {}); seed {seed:#x} \
             (KEEL_CRASH_SEED={seed:#x} cargo test -p keel-orchestrator --test \
             crash_consistency replays the choices); data dir kept at {}, keeld's log in \
             keeld.log there:\n",
            vs.len(),
            count_kinds(&vs),
            k.dir.display()
        );
        for (round, v) in &all {
            let _ = writeln!(msg, "  round {round} [{}] {}", v.kind, v.msg);
        }
        panic!("{msg}");
    }

    // Everything stopped through keeld; the harness removes the rest.
    let running: Vec<String> = before
        .vms
        .iter()
        .filter(|(_, vm)| !matches!(status(vm), "stopped" | "error"))
        .map(|(id, _)| id.clone())
        .collect();
    if !running.is_empty() {
        let r = k
            .admin
            .post(
                "/api/v1/vms/batch",
                &json!({"action": "force-off", "vms": running}),
            )
            .expect("batch force-off");
        for res in r["results"].as_array().into_iter().flatten() {
            if res["operation"].is_object() {
                let op = op_outcome(&k.admin, res);
                assert_eq!(op["status"], "succeeded", "{op}");
            }
        }
    }
    let start = Instant::now();
    while !k.vmm_pids().is_empty() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        k.vmm_pids().is_empty(),
        "keel-vmm still runs after every VM was forced off: {:?}",
        k.vmm_pids()
    );
}

/// The pid in VM `id`'s `vmm.lock` (the last keel-vmm that ran it).
fn lock_pid(k: &Keeld, id: &str) -> Option<i64> {
    std::fs::read_to_string(k.dir.join(format!("data/vms/{id}/vmm.lock")))
        .ok()?
        .trim()
        .parse()
        .ok()
}
