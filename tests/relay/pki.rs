//! Certificates made by the tests (openssl, EC P-256): a CA, a server
//! certificate for `localhost` and 127.0.0.1, a client certificate the CA
//! signed, and a self-signed "rogue" server certificate. Nothing here is
//! checked in; each test run makes its own in a temporary directory.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use mm4relay::tls::{Acceptor, Identity};
use native_tls::{Certificate, Protocol, TlsConnector};
use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
};
use openssl::x509::{X509, X509NameBuilder};

/// One certificate and its key, as PEM files.
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl Pair {
    /// The relay's TLS 1.2+ server side with this certificate.
    pub fn acceptor(&self) -> Acceptor {
        Acceptor::new(&Identity::from_pem(&self.cert_pem, &self.key_pem).unwrap()).unwrap()
    }
}

/// The test PKI.
pub struct Pki {
    /// Holds the files; removed with the `Pki`.
    _dir: tempfile::TempDir,
    pub ca: PathBuf,
    ca_pem: Vec<u8>,
    pub server: Pair,
    pub client: Pair,
    pub rogue: Pair,
}

fn key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

fn build(
    cn: &str,
    key: &PKey<Private>,
    issuer: Option<(&X509, &PKey<Private>)>,
    kind: &str,
) -> X509 {
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_nid(Nid::COMMONNAME, cn).unwrap();
    let name = name.build();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    let mut serial = BigNum::new().unwrap();
    serial.rand(64, MsbOption::MAYBE_ZERO, false).unwrap();
    b.set_serial_number(&serial.to_asn1_integer().unwrap())
        .unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(issuer.map_or(&name, |(c, _)| c.subject_name()))
        .unwrap();
    b.set_pubkey(key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(2).unwrap())
        .unwrap();
    match kind {
        "ca" => {
            b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
                .unwrap();
            b.append_extension(
                KeyUsage::new()
                    .critical()
                    .key_cert_sign()
                    .crl_sign()
                    .build()
                    .unwrap(),
            )
            .unwrap();
        }
        "server" => {
            let ctx = b.x509v3_context(issuer.map(|(c, _)| &**c), None);
            let san = SubjectAlternativeName::new()
                .dns("localhost")
                .ip("127.0.0.1")
                .build(&ctx)
                .unwrap();
            b.append_extension(san).unwrap();
            b.append_extension(ExtendedKeyUsage::new().server_auth().build().unwrap())
                .unwrap();
        }
        _ => {
            b.append_extension(ExtendedKeyUsage::new().client_auth().build().unwrap())
                .unwrap();
        }
    }
    let signer = issuer.map_or(key, |(_, k)| k);
    b.sign(signer, MessageDigest::sha256()).unwrap();
    b.build()
}

fn write(dir: &Path, name: &str, cert: &X509, key: &PKey<Private>) -> Pair {
    let cert_pem = cert.to_pem().unwrap();
    let key_pem = key.private_key_to_pem_pkcs8().unwrap();
    let (c, k) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, &cert_pem).unwrap();
    std::fs::write(&k, &key_pem).unwrap();
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
    Pair {
        cert: c,
        key: k,
        cert_pem,
        key_pem,
    }
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = key();
        let ca = build("mm4relay test CA", &ca_key, None, "ca");
        let ca_pem = ca.to_pem().unwrap();
        let ca_path = dir.path().join("ca.crt");
        std::fs::write(&ca_path, &ca_pem).unwrap();
        let sk = key();
        let server = build("localhost", &sk, Some((&ca, &ca_key)), "server");
        let ck = key();
        let client = build("relay-client.test", &ck, Some((&ca, &ca_key)), "client");
        let rk = key();
        let rogue = build("localhost", &rk, None, "server");
        Pki {
            ca: ca_path,
            ca_pem,
            server: write(dir.path(), "server", &server, &sk),
            client: write(dir.path(), "client", &client, &ck),
            rogue: write(dir.path(), "rogue", &rogue, &rk),
            _dir: dir,
        }
    }

    /// A client side that trusts only the test CA's chain (and the system's).
    pub fn connector(&self) -> TlsConnector {
        TlsConnector::builder()
            .add_root_certificate(Certificate::from_pem(&self.ca_pem).unwrap())
            .min_protocol_version(Some(Protocol::Tlsv12))
            .build()
            .unwrap()
    }

    /// The `[listener]` lines that give the relay the server certificate.
    pub fn listener_lines(&self) -> String {
        format!(
            "tls_cert = {}\ntls_key = {}\n",
            self.server.cert.display(),
            self.server.key.display()
        )
    }
}
