//! The load step: what a parsed [`Draft`] names is read and resolved.
//! Certificates and keys are read and matched, CA bundles read, the users
//! file read, host names resolved, the hostname asked of the system, and
//! files holding secrets that others may read are warned about.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::tls::Identity;

use super::parse::{Draft, IdentityFiles, duplicate_user, np_table};
use super::section::parse_auth_user;
use super::{Config, ConfigError, PortedLoad, TlsRoots};

impl Draft {
    /// Reads the files and resolves the names the configuration gives.
    pub fn load(self) -> Result<Config, ConfigError> {
        let Draft {
            mut config,
            listen,
            listen_tls,
            metrics_listen,
            listener_identity,
            peer_files,
            users_file,
            dns_servers,
            defaults_files,
            secrets,
        } = self;
        let file = config.path.display().to_string();
        let at = |section: &str, key: &str, value: &str, problem: String| {
            ConfigError::at(&file, section, key, value, problem)
        };
        let resolve_all = |key: &str, list: &[String]| -> Result<Vec<SocketAddr>, ConfigError> {
            list.iter()
                .map(|a| resolve(a).map_err(|p| at("listener", key, &list.join(", "), p)))
                .collect()
        };
        let mut warnings = std::mem::take(&mut config.warnings);
        if config.relay.hostname.is_empty() {
            config.relay.hostname = system_hostname();
        }
        if let Some(m) = &metrics_listen {
            config.relay.metrics_listen =
                Some(resolve(m).map_err(|p| at("relay", "metrics_listen", m, p))?);
        }
        config.listener.listen = resolve_all("listen", &listen)?;
        config.listener.listen_tls = resolve_all("listen_tls", &listen_tls)?;
        if let Some(files) = &listener_identity {
            config.listener.tls_identity = Some(identity(&file, files, &mut warnings)?);
        }
        for (peer, files) in config.peers.iter_mut().zip(&peer_files) {
            let section = format!("peer.{}", peer.name);
            load_peer_files(&file, &section, peer, files, &mut warnings)?;
        }
        if let Some(d) = &mut config.dynamic {
            load_peer_files(
                &file,
                "peer_defaults",
                &mut d.defaults,
                &defaults_files,
                &mut warnings,
            )?;
        }
        if let (None, needed) = &dns_servers {
            config.dns.servers = resolv_conf_servers(Path::new(RESOLV_CONF));
            if *needed && config.dns.servers.is_empty() {
                return Err(at(
                    "dns",
                    "servers",
                    "",
                    format!("{RESOLV_CONF} names no nameserver: give [dns] servers"),
                ));
            }
        }
        let started = std::time::Instant::now();
        if let Some(path) = &config.ported_file {
            let shown = path.display().to_string();
            let text = read_text(path)
                .map_err(|e| ConfigError::at(&shown, "", "", "", format!("cannot read: {e}")))?;
            let np = np_table(&config.ported, Some((&text, &config.peers)))
                .map_err(|e| ConfigError::at(&shown, "", "", "", e.to_string()))?;
            config.np = Arc::new(np);
        }
        config.ported_load = PortedLoad {
            file: config.ported_file.clone(),
            entries: config.np.len(),
            seconds: started.elapsed().as_secs_f64(),
            at: Some(std::time::SystemTime::now()),
        };
        if let Some((k, v)) = &users_file {
            let users =
                read_users(&config, v.trim(), &mut warnings).map_err(|p| at("auth", k, v, p))?;
            config.auth_users.extend(users);
        }
        duplicate_user(&file, &config.auth_users)?;
        if secrets {
            if let Some(w) = readable_by_others(&config.path) {
                warnings.push(format!("{file}: {w}"));
            }
        }
        config.warnings = warnings;
        Ok(config)
    }
}

/// Where the system's resolvers are listed.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// The `nameserver` lines of a resolv.conf, on port 53 (none if it cannot
/// be read).
fn resolv_conf_servers(path: &Path) -> Vec<SocketAddr> {
    let Ok(text) = read_text(path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|v| v.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// A peer's client identity and CA bundle, read from the files it names.
fn load_peer_files(
    file: &str,
    section: &str,
    peer: &mut super::PeerConfig,
    files: &super::parse::PeerFiles,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    if let Some(f) = &files.identity {
        peer.tls_client_identity = Some(identity(file, f, warnings)?);
    }
    if let Some(path) = &files.ca_file {
        let err = |p: String| ConfigError::at(file, section, "tls_ca_file", path, p);
        let pem = read_file(Path::new(path)).map_err(|e| err(format!("cannot read: {e}")))?;
        let roots = native_tls::Certificate::stack_from_pem(&pem)
            .ok()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| err("holds no PEM certificate".into()))?;
        peer.tls_ca = Some(TlsRoots(roots));
    }
    Ok(())
}

/// The accounts of a users file: one `NAME:PEER:PASSWORD` a line, `#`
/// comments.
fn read_users(
    config: &Config,
    path: &str,
    warnings: &mut Vec<String>,
) -> Result<Vec<super::AuthUser>, String> {
    let text = read_text(Path::new(path)).map_err(|e| format!("cannot read: {e}"))?;
    if let Some(w) = readable_by_others(Path::new(path)) {
        warnings.push(format!("{path}: {w}"));
    }
    let peer_index = |n: &str| config.peers.iter().position(|p| p.name == n);
    let mut users = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, rest) = line.split_once(':').unwrap_or((line, ""));
        let user = parse_auth_user(name.trim(), rest, peer_index)
            .map_err(|p| format!("line {}: {p}", n + 1))?;
        users.push(user);
    }
    Ok(users)
}

/// A certificate and key from PEM files or a PKCS#12 file and its
/// password. Key files readable by others add a warning.
fn identity(
    file: &str,
    f: &IdentityFiles,
    warnings: &mut Vec<String>,
) -> Result<Identity, ConfigError> {
    let [cert, key, p12, p12_password] = f.keys;
    let [cert_v, key_v, p12_v, password] = &f.values;
    let err = |k: &str, v: &str, problem: String| ConfigError::at(file, &f.section, k, v, problem);
    let read = |k: &str, path: &str| {
        read_file(Path::new(path)).map_err(|e| err(k, path, format!("cannot read: {e}")))
    };
    let (path, identity) = if p12_v.is_empty() {
        let (c, k) = (read(cert, cert_v)?, read(key, key_v)?);
        let id = Identity::from_pem(&c, &k).map_err(|e| {
            err(
                key,
                key_v,
                format!("not a usable PEM certificate and key: {e}"),
            )
        })?;
        // native-tls finds a key of another certificate only at the first
        // handshake: find it now.
        let leaf = openssl::x509::X509::from_pem(&c)
            .map_err(|e| err(cert, cert_v, format!("not a PEM certificate: {e}")))?;
        let pkey = openssl::pkey::PKey::private_key_from_pem(&k)
            .map_err(|e| err(key, key_v, format!("not a PEM private key: {e}")))?;
        if !leaf.public_key().is_ok_and(|p| p.public_eq(&pkey)) {
            return Err(err(
                key,
                key_v,
                format!("this key does not belong to the certificate in {cert}"),
            ));
        }
        if let Some(w) = expired(&leaf) {
            warnings.push(format!("{file}: [{}] {cert}: {w}", f.section));
        }
        (PathBuf::from(key_v), id)
    } else {
        let der = read(p12, p12_v)?;
        let id = Identity::from_pkcs12(&der, password).map_err(|e| {
            err(
                p12,
                p12_v,
                format!("not a usable PKCS#12 file with {p12_password}: {e}"),
            )
        })?;
        (PathBuf::from(p12_v), id)
    };
    if let Some(w) = readable_by_others(&path) {
        warnings.push(format!("{file}: [{}] {}: {w}", f.section, path.display()));
    }
    Ok(identity)
}

/// The contents of a file the configuration names, which must be a
/// regular file (through a link is fine): not a FIFO, whose open would
/// wait for a writer, nor a device such as /dev/zero, which never ends.
/// The file is opened without blocking and checked before it is read.
pub(super) fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mut data = Vec::with_capacity(meta.len().min(1 << 30) as usize);
    file.read_to_end(&mut data)?;
    Ok(data)
}

/// As [`read_file`], as UTF-8 text.
pub(super) fn read_text(path: &Path) -> std::io::Result<String> {
    String::from_utf8(read_file(path)?)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// A warning if `cert` has expired or is not valid yet.
fn expired(cert: &openssl::x509::X509Ref) -> Option<String> {
    let now = openssl::asn1::Asn1Time::days_from_now(0).ok()?;
    if cert.not_after() < now {
        Some(format!("the certificate expired on {}", cert.not_after()))
    } else if cert.not_before() > now {
        Some(format!(
            "the certificate is valid only from {}",
            cert.not_before()
        ))
    } else {
        None
    }
}

/// A warning if `path` holds a secret that users other than its owner
/// and group may read.
fn readable_by_others(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o004 != 0).then(|| {
        format!(
            "holds secrets and is readable by every user (mode {:o}); chmod o-r it",
            mode & 0o777
        )
    })
}

fn resolve(v: &str) -> Result<SocketAddr, String> {
    v.to_socket_addrs()
        .map_err(|e| format!("{v:?} is not host:port ({e})"))?
        .next()
        .ok_or_else(|| format!("{v:?} resolves to no address"))
}

fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}
