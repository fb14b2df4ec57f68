//! `barnraise org new|show|enroll|inspect|revoke`: an institution's org key,
//! and the node certificates it signs. The org key stays with the
//! institution; what leaves it is the org id (for run operators) and one
//! certificate file per node (for the node's operator).

use anyhow::{Context, bail};
use barnraise_protocol::certificate::{
    certificate_id, format_utc, load_certificate, save_certificate,
};
use barnraise_protocol::limits::MAX_TEXT_BYTES;
use barnraise_protocol::messages::NodeCertificate;
use barnraise_protocol::{NodeId, Signed, SigningKey};
use clap::Subcommand;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

const MS_PER_DAY: u64 = 24 * 60 * 60 * 1000;
/// Largest org info file read; it holds a name and an id.
const MAX_ORG_INFO_BYTES: u64 = 4096;

#[derive(Debug, Subcommand)]
pub enum OrgCommand {
    /// Create an org key for an institution, plus an info file next to it
    /// (`org.toml`) that records the org's name. Refuses to overwrite either.
    /// Prints the org id and the line a run operator adds to admit the org.
    New {
        /// The institution's name as runs and dashboards will show it,
        /// e.g. "Example University" (at most 256 bytes).
        #[arg(long)]
        name: String,
        /// Org key file to create [default: ~/.barnraise/org.key].
        #[arg(long, env = "BARNRAISE_ORG_KEY")]
        key: Option<PathBuf>,
    },
    /// Print an org key's id and name, and the config line that admits it.
    Show {
        /// Org key file [default: ~/.barnraise/org.key].
        #[arg(long, env = "BARNRAISE_ORG_KEY")]
        key: Option<PathBuf>,
    },
    /// Sign a certificate that vouches for one node, and write it to a file
    /// the node presents when it joins (`barnraise node --certificate FILE`).
    Enroll {
        /// The node's id: 64 hex characters, which the node's operator gets
        /// from `barnraise id show`.
        #[arg(long)]
        node: NodeId,
        /// Org key file [default: ~/.barnraise/org.key].
        #[arg(long, env = "BARNRAISE_ORG_KEY")]
        key: Option<PathBuf>,
        /// Org name to put in the certificate [default: the name in the
        /// info file next to the key].
        #[arg(long)]
        name: Option<String>,
        /// Days until the certificate expires.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
        /// How many workers (GPUs, or trainer processes) the org vouches this
        /// node runs. A join under the certificate may declare at most this
        /// many, and its tokens and credit are bounded by them.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=barnraise_protocol::limits::MAX_WORKERS_PER_NODE as i64))]
        max_workers: u32,
        /// Where to write the certificate; never overwritten
        /// [default: ./<first 12 hex characters of the node id>.cert].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print what a certificate file says (org, node, dates, id) and whether
    /// it is valid now. Exits with an error when it is not.
    Inspect {
        /// The certificate file.
        file: PathBuf,
    },
    /// Print the line a run operator adds to the coordinator config to stop
    /// accepting a certificate. Revocation is the run's decision: the file
    /// itself stays as it is.
    Revoke {
        /// The certificate file to revoke.
        file: PathBuf,
    },
}

/// What `org.toml` records. The id is there for people reading the file; the
/// key is what counts, and a mismatch is an error.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrgInfo {
    name: String,
    org: String,
}

fn key_path(key: Option<PathBuf>) -> PathBuf {
    key.unwrap_or_else(|| super::default_home().join("org.key"))
}

/// The info file that belongs to a key: `org.key` → `org.toml`.
fn info_path(key: &Path) -> anyhow::Result<PathBuf> {
    let info = key.with_extension("toml");
    if info == key {
        bail!(
            "org key {} ends in .toml, where its info file would go; name the key something.key",
            key.display()
        );
    }
    Ok(info)
}

fn check_name(name: &str) -> anyhow::Result<()> {
    if name.trim().is_empty() {
        bail!("the org name is empty; give the institution's name with --name");
    }
    if name.len() > MAX_TEXT_BYTES {
        bail!(
            "the org name is {} bytes; at most {MAX_TEXT_BYTES} fit in a certificate",
            name.len()
        );
    }
    if name.chars().any(char::is_control) {
        bail!("the org name contains control characters (newlines, tabs); use plain text");
    }
    Ok(())
}

/// Reads the info file next to `key`, if there is one.
fn read_info(key_file: &Path, key: &SigningKey) -> anyhow::Result<Option<OrgInfo>> {
    let path = info_path(key_file)?;
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(e).with_context(|| format!("reading org info file {}", path.display()));
        }
    };
    let mut text = String::new();
    file.take(MAX_ORG_INFO_BYTES + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("reading org info file {}", path.display()))?;
    if text.len() as u64 > MAX_ORG_INFO_BYTES {
        bail!(
            "org info file {} is larger than {MAX_ORG_INFO_BYTES} bytes; it should hold a name and an id",
            path.display()
        );
    }
    let info: OrgInfo = toml::from_str(&text)
        .with_context(|| format!("org info file {} is malformed", path.display()))?;
    if info.org != key.org_id().to_string() {
        bail!(
            "org info file {} names org {}, but the key {} is org {}; the two files do not belong together",
            path.display(),
            info.org,
            key_file.display(),
            key.org_id()
        );
    }
    check_name(&info.name).with_context(|| format!("org info file {}", path.display()))?;
    Ok(Some(info))
}

fn write_info(path: &Path, info: &OrgInfo) -> anyhow::Result<()> {
    let text = toml::to_string(info).context("encoding the org info")?;
    let text = format!(
        "# barnraise org info: the name enrolled certificates carry. The org key next to\n\
         # this file is secret; this file and the org id are not.\n{text}"
    );
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating org info file {}", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing org info file {}", path.display()))
}

fn load_key(path: &Path) -> anyhow::Result<SigningKey> {
    SigningKey::load(path).map_err(|e| match e {
        barnraise_protocol::identity::IdentityError::Missing { .. } => anyhow::anyhow!(
            "org key file {} does not exist; create one with `barnraise org new --name \"...\"` (or point --key at it)",
            path.display()
        ),
        other => other.into(),
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn print_admission_line(key: &SigningKey) {
    println!(
        "To admit this org's nodes, the run's operator puts its id in the coordinator config:"
    );
    println!();
    println!("    [admission]");
    println!("    policy = \"orgs\"");
    println!("    orgs = [\"{}\"]", key.org_id());
}

pub fn run(command: OrgCommand) -> anyhow::Result<()> {
    match command {
        OrgCommand::New { name, key } => new(&name, &key_path(key)),
        OrgCommand::Show { key } => show(&key_path(key)),
        OrgCommand::Enroll {
            node,
            key,
            name,
            days,
            max_workers,
            out,
        } => enroll(node, &key_path(key), name, days, max_workers, out),
        OrgCommand::Inspect { file } => inspect(&file),
        OrgCommand::Revoke { file } => revoke(&file),
    }
}

fn new(name: &str, key_file: &Path) -> anyhow::Result<()> {
    check_name(name)?;
    let info = info_path(key_file)?;
    if info.exists() {
        bail!(
            "org info file {} already exists; refusing to overwrite an org",
            info.display()
        );
    }
    let key = SigningKey::generate()?;
    key.save_new(key_file)?;
    write_info(
        &info,
        &OrgInfo {
            name: name.to_string(),
            org: key.org_id().to_string(),
        },
    )?;
    println!(
        "created org key {} (keep it private: it vouches for your nodes)",
        key_file.display()
    );
    println!("created org info {}", info.display());
    println!("org:    {name}");
    println!("org id: {}", key.org_id());
    println!();
    print_admission_line(&key);
    println!();
    println!(
        "Enroll a node with `barnraise org enroll --node <node id>`; its operator gets the id from `barnraise id show`."
    );
    Ok(())
}

fn show(key_file: &Path) -> anyhow::Result<()> {
    let key = load_key(key_file)?;
    match read_info(key_file, &key)? {
        Some(info) => println!("org:    {}", info.name),
        None => println!(
            "org:    (no info file at {}; give --name to `org enroll`)",
            info_path(key_file)?.display()
        ),
    }
    println!("org id: {}", key.org_id());
    println!("key:    {}", key_file.display());
    println!();
    print_admission_line(&key);
    Ok(())
}

fn enroll(
    node: NodeId,
    key_file: &Path,
    name: Option<String>,
    days: u32,
    max_workers: u32,
    out: Option<PathBuf>,
) -> anyhow::Result<()> {
    let key = load_key(key_file)?;
    let name = match name {
        Some(name) => name,
        None => match read_info(key_file, &key)? {
            Some(info) => info.name,
            None => bail!(
                "no org name: {} does not exist; give --name \"...\"",
                info_path(key_file)?.display()
            ),
        },
    };
    check_name(&name)?;
    if node.0 == key.public() {
        bail!(
            "{node} is this org's own id; a node needs its own key (`barnraise id new` on the node)"
        );
    }
    let issued_ms = now_ms();
    let body = NodeCertificate {
        org: key.org_id(),
        org_name: name.clone(),
        node,
        issued_ms,
        expires_ms: issued_ms.saturating_add(u64::from(days) * MS_PER_DAY),
        max_workers,
    };
    let cert = Signed::sign(&key, &body).context("signing the certificate")?;
    let out = out.unwrap_or_else(|| PathBuf::from(format!("{}.cert", node.short())));
    save_certificate(&out, &cert)?;
    println!("wrote {}", out.display());
    println!(
        "{name} vouches for node {node}, up to {max_workers} workers, until {}",
        format_utc(body.expires_ms)
    );
    println!("certificate id: {}", certificate_id(&cert));
    println!();
    println!("Give the file to the node's operator; the node presents it when it joins:");
    println!();
    println!("    barnraise node --certificate {}", out.display());
    Ok(())
}

fn describe(file: &Path, cert: &Signed<NodeCertificate>) -> anyhow::Result<NodeCertificate> {
    let body = cert
        .verify(None)
        .with_context(|| format!("certificate file {}", file.display()))?;
    println!("certificate: {}", file.display());
    println!("org:         {} ({})", body.org_name, body.org);
    println!("node:        {}", body.node);
    println!("issued:      {}", format_utc(body.issued_ms));
    println!("expires:     {}", format_utc(body.expires_ms));
    println!("max workers: {}", body.max_workers);
    println!("id:          {}", certificate_id(cert));
    Ok(body)
}

fn inspect(file: &Path) -> anyhow::Result<()> {
    let cert = load_certificate(file)?;
    let body = describe(file, &cert)?;
    let now = now_ms();
    // The same slack the coordinator allows for clocks that disagree.
    let skew = barnraise_coordinator::admission::MAX_CLOCK_SKEW_MS;
    if body.issued_ms > now.saturating_add(skew) {
        println!("status:      NOT VALID: issued in the future");
        bail!(
            "certificate file {} says it was issued at {}, after now; check the org's clock",
            file.display(),
            format_utc(body.issued_ms)
        );
    }
    if body.expires_ms <= now {
        println!("status:      EXPIRED");
        bail!(
            "certificate file {} expired at {}; the org can enroll the node again",
            file.display(),
            format_utc(body.expires_ms)
        );
    }
    let days = (body.expires_ms - now) / MS_PER_DAY;
    println!("status:      valid now (signed by the org it names; expires in {days} days)");
    Ok(())
}

fn revoke(file: &Path) -> anyhow::Result<()> {
    let cert = load_certificate(file)?;
    let body = describe(file, &cert)?;
    println!();
    println!("To stop accepting this certificate, the run's operator adds its id to the");
    println!("coordinator config and restarts the coordinator:");
    println!();
    println!("    [admission]");
    println!("    revoked_certificates = [\"{}\"]", certificate_id(&cert));
    println!();
    println!("Other certificates for the node still admit it. To refuse the node whatever");
    println!("certificate it shows, add instead:");
    println!();
    println!("    revoked_nodes = [\"{}\"]", body.node);
    Ok(())
}
