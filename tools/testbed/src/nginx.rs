//! nginx for the local stack: the snippets under nix/nginx (the same files the NixOS module
//! uses) rendered into a runtime directory with this run's values.

use super::process::{Process, find_program, is_root, tail, user_ids, wait_until};
use super::tls::Certificates;
use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The snippets, compiled in so the launcher needs no source tree at run time.
const SNIPPETS: &[(&str, &str)] = &[
    ("http.conf", include_str!("../../../nix/nginx/http.conf")),
    ("server.conf", include_str!("../../../nix/nginx/server.conf")),
    ("headers.conf", include_str!("../../../nix/nginx/headers.conf")),
    ("catch-all.conf", include_str!("../../../nix/nginx/catch-all.conf")),
    ("tls-modern.conf", include_str!("../../../nix/nginx/tls-modern.conf")),
    (
        "tls-intermediate.conf",
        include_str!("../../../nix/nginx/tls-intermediate.conf"),
    ),
];
const LOCAL_CONF: &str = include_str!("../../../nix/nginx/local.conf");

/// The static files of this source tree.
pub const STATIC_ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../static");

#[derive(Clone, Debug)]
pub struct NginxOptions {
    pub https_port: u16,
    pub http_port: u16,
    /// Where the app processes listen, as nginx's `server` takes them; set by `Deployment::start`.
    pub upstreams: Vec<String>,
    pub static_root: PathBuf,
    /// `modern` (TLS 1.3 only) or `intermediate` (TLS 1.2 + 1.3).
    pub tls_profile: String,
    /// Per client: requests per second, burst, concurrent connections.
    pub rate: u32,
    pub burst: u32,
    pub conn_limit: u32,
    /// Tests only: a request header from 127.0.0.1 that sets the client's address (nginx's
    /// realip module), to act as clients other than 127.0.0.1. `None`: the connection's.
    pub client_address_header: Option<String>,
}

impl NginxOptions {
    pub fn new(https_port: u16, http_port: u16) -> Self {
        NginxOptions {
            https_port,
            http_port,
            upstreams: Vec::new(),
            static_root: PathBuf::from(STATIC_ROOT),
            tls_profile: "modern".into(),
            rate: 10,
            burst: 20,
            conn_limit: 20,
            client_address_header: None,
        }
    }
}

pub struct Nginx {
    pub process: Process,
    pub dir: PathBuf,
    /// The `/stats` cache's own directory when it cannot live under `dir` (see `cache_dir`).
    _cache: Option<tempfile::TempDir>,
}

/// Where nginx's workers keep the `/stats` cache. As root they run as nginx's compiled-in
/// user (`nobody`), which cannot enter the private (0700) scratch directory: the cache then
/// gets a private directory of its own in the temp dir, owned by that user.
fn cache_dir(dir: &Path) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    if !is_root() {
        return Ok((dir.join("cache"), None));
    }
    let (uid, gid) = user_ids("nobody").context("running as root, and no `nobody` user exists for nginx's workers")?;
    let cache = tempfile::Builder::new().prefix("pageviews-nginx-cache-").tempdir()?;
    std::os::unix::fs::chown(cache.path(), Some(uid), Some(gid))?;
    Ok((cache.path().to_owned(), Some(cache)))
}

impl Nginx {
    pub async fn start(dir: &Path, options: &NginxOptions, certificates: &Certificates) -> anyhow::Result<Nginx> {
        if !matches!(options.tls_profile.as_str(), "modern" | "intermediate") {
            bail!(
                "TLS profile {:?} is not \"modern\" or \"intermediate\"",
                options.tls_profile
            );
        }
        let nginx = find_program("nginx", &["/usr/sbin"], "nginx")?;
        let version = Version::of(&nginx)?;
        let conf_dir = dir.join("conf");
        std::fs::create_dir_all(&conf_dir)?;
        let (cache, cache_guard) = cache_dir(dir)?;
        let values = placeholders(dir, &conf_dir, &cache, options, certificates, &version);
        for (name, text) in SNIPPETS {
            std::fs::write(conf_dir.join(name), render(text, &values)?)?;
        }
        let main = dir.join("nginx.conf");
        std::fs::write(&main, render(LOCAL_CONF, &values)?)?;

        let log = dir.join("nginx.out");
        let test = Command::new(&nginx)
            .arg("-t")
            .arg("-q")
            .args(prefix_args(dir, &main))
            .output()?;
        if !test.status.success() {
            bail!(
                "nginx rejects the configuration: {}",
                String::from_utf8_lossy(&test.stderr)
            );
        }
        let mut command = Command::new(&nginx);
        command.args(prefix_args(dir, &main));
        let process = Process::spawn("nginx", &mut command, &log)?;
        let port = options.https_port;
        wait_until("nginx", Duration::from_secs(10), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map(|_| ())
                .map_err(anyhow::Error::from)
        })
        .await
        .with_context(|| format!("nginx error log:\n{}", tail(&dir.join("error.log"), 20)))?;
        Ok(Nginx {
            process,
            dir: dir.to_owned(),
            _cache: cache_guard,
        })
    }

    /// `systemctl reload nginx` (SIGHUP to the master): returns once the master runs new
    /// worker processes and every old one has exited (each finishes its requests first).
    pub async fn reload(&self) -> anyhow::Result<()> {
        let master = self.process.pid();
        let before = worker_pids(master)?;
        anyhow::ensure!(!before.is_empty(), "nginx runs no worker processes");
        // SAFETY: kill(2) on the master we started (not its group: workers take no SIGHUP).
        if unsafe { libc::kill(master as i32, libc::SIGHUP) } != 0 {
            bail!("cannot signal nginx: {}", std::io::Error::last_os_error());
        }
        wait_until("nginx's workers to be replaced", Duration::from_secs(20), || {
            let before = before.clone();
            async move {
                let now = worker_pids(master)?;
                anyhow::ensure!(
                    !now.is_empty() && now.iter().all(|pid| !before.contains(pid)),
                    "workers {now:?}, before the reload {before:?}"
                );
                Ok(())
            }
        })
        .await
        .with_context(|| format!("nginx error log:\n{}", tail(&self.dir.join("error.log"), 20)))
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }
}

/// The master's children: its worker (and cache) processes.
fn worker_pids(master: u32) -> anyhow::Result<Vec<u32>> {
    let path = format!("/proc/{master}/task/{master}/children");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    Ok(text.split_whitespace().filter_map(|pid| pid.parse().ok()).collect())
}

fn prefix_args(dir: &Path, main: &Path) -> Vec<std::ffi::OsString> {
    let mut prefix = dir.as_os_str().to_owned();
    prefix.push("/");
    // -e (nginx >= 1.19.5) keeps the startup error log out of the compiled-in path.
    vec![
        "-p".into(),
        prefix,
        "-e".into(),
        dir.join("error.log").into(),
        "-c".into(),
        main.into(),
    ]
}

fn placeholders(
    dir: &Path,
    conf_dir: &Path,
    cache: &Path,
    options: &NginxOptions,
    certificates: &Certificates,
    version: &Version,
) -> Vec<(&'static str, String)> {
    let path = |p: &Path| p.display().to_string();
    // `http2 on;` exists from nginx 1.25.1; older versions take `http2` on the listen line.
    let (listen_http2, http2_on) = if version.nginx >= (1, 25, 1) {
        ("", "http2 on;")
    } else {
        ("http2", "")
    };
    // The hybrid post-quantum group needs OpenSSL 3.5.
    let ecdh_curve = if version.openssl >= (3, 5, 0) {
        "X25519MLKEM768:X25519:prime256v1:secp384r1"
    } else {
        "X25519:prime256v1:secp384r1"
    };
    vec![
        ("runtime_dir", path(dir)),
        ("conf_dir", path(conf_dir)),
        ("access_log", path(&dir.join("access.log"))),
        ("cache_dir", path(cache)),
        ("http_port", options.http_port.to_string()),
        ("https_port", options.https_port.to_string()),
        ("listen_http2", listen_http2.into()),
        ("http2_on", http2_on.into()),
        ("cert", path(&certificates.chain)),
        ("key", path(&certificates.key)),
        ("tls_profile", options.tls_profile.clone()),
        ("ecdh_curve", ecdh_curve.into()),
        ("upstream_servers", upstream_servers(&options.upstreams)),
        ("static_root", path(&options.static_root)),
        ("rate", format!("{}r/s", options.rate)),
        ("burst", options.burst.to_string()),
        ("conn_limit", options.conn_limit.to_string()),
        (
            "client_address",
            options
                .client_address_header
                .as_ref()
                .map(|header| format!("set_real_ip_from 127.0.0.1;\n    real_ip_header {header};"))
                .unwrap_or_default(),
        ),
    ]
}

/// Passive failover: after one failed attempt an app is left out for 10 s. The NixOS module
/// (nix/modules/proxy.nix) writes the same parameters.
pub const UPSTREAM_PARAMETERS: &str = "max_fails=1 fail_timeout=10s";

fn upstream_servers(addresses: &[String]) -> String {
    addresses
        .iter()
        .map(|a| format!("server {a} {UPSTREAM_PARAMETERS};"))
        .collect::<Vec<_>>()
        .join("\n    ")
}

/// Replaces every `@name@`; a placeholder without a value is an error, as with nixpkgs'
/// `replaceVars`, so the two renderers cannot drift apart silently.
pub fn render(text: &str, values: &[(&str, String)]) -> anyhow::Result<String> {
    let mut out = text.to_owned();
    for (name, value) in values {
        out = out.replace(&format!("@{name}@"), value);
    }
    let leftover: Vec<&str> = out
        .split('@')
        .skip(1)
        .step_by(2)
        .filter(|name| !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .collect();
    if !leftover.is_empty() {
        bail!("nginx snippet has placeholders without a value: {leftover:?}");
    }
    Ok(out)
}

struct Version {
    nginx: (u32, u32, u32),
    openssl: (u32, u32, u32),
}

impl Version {
    fn of(nginx: &Path) -> anyhow::Result<Version> {
        let output = Command::new(nginx).arg("-V").output().context("cannot run nginx -V")?;
        let text = String::from_utf8_lossy(&output.stderr);
        let after = |marker: &str| text.split(marker).nth(1).map(parse_version);
        Ok(Version {
            nginx: after("nginx/").context("nginx -V printed no version")?,
            openssl: after("OpenSSL ").unwrap_or((0, 0, 0)),
        })
    }
}

fn parse_version(text: &str) -> (u32, u32, u32) {
    let mut parts = text
        .split(|c: char| !c.is_ascii_digit())
        .take(3)
        .map(|p| p.parse().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_refuses_a_placeholder_without_value() {
        let values = vec![("rate", "10r/s".to_owned())];
        assert_eq!(render("rate=@rate@;", &values).unwrap(), "rate=10r/s;");
        let err = render("server @upstream@;", &values).unwrap_err().to_string();
        assert!(err.contains("upstream"), "{err}");
        // An e-mail-like @ in a comment is not a placeholder.
        assert!(render("# ops@example.org", &values).is_ok());
    }

    #[test]
    fn versions_parse() {
        assert_eq!(parse_version("1.22.1\nbuilt"), (1, 22, 1));
        assert_eq!(parse_version("3.0.22 25 Aug"), (3, 0, 22));
    }
}
