//! The cluster's TLS identity (`lbcluster tls`): a cluster CA, node certificates signed by it,
//! and the name a node certificate stands for.
//!
//! The CA is a self-signed ECDSA P-256 certificate (`ca.pem`, key `ca.key`). A node certificate
//! names the node as its common name and as its one DNS subject alternative name, lists the
//! node's addresses as IP SANs, and is good for both TLS server and client authentication, so
//! the same certificate serves both ends of the node's mutual-TLS QUIC connections. Private keys
//! are written with mode 0600; existing files are never overwritten without `force`.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// The CA certificate's file name inside the CA directory.
pub(crate) const CA_CERT_FILE: &str = "ca.pem";
/// The CA private key's file name inside the CA directory.
pub(crate) const CA_KEY_FILE: &str = "ca.key";

/// Certificates start to be valid this long before they are made, so a peer whose clock is a
/// little behind does not refuse a fresh certificate.
const BACKDATE: Duration = Duration::hours(1);

/// Checks that `name` can be a node name: a lowercase DNS name (labels of `a-z`, `0-9` and `-`,
/// not starting or ending with `-`, at most 63 bytes each, 253 in all), not an IP address, and not
/// `ca` (the CA's files are `ca.pem` and `ca.key`). The name is the node's identity in its
/// certificate, so it must compare exactly: no upper case, no trailing dot.
pub(crate) fn validate_node_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a node name cannot be empty".into());
    }
    if name.len() > 253 {
        return Err(format!("{name:?} is longer than 253 bytes"));
    }
    if name.parse::<IpAddr>().is_ok() {
        return Err(format!(
            "{name:?} is an IP address; a node name is a DNS name (give the address with --ip)"
        ));
    }
    if name == "ca" {
        return Err("the name \"ca\" is taken by the cluster CA's files".into());
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(format!(
                "{name:?} is not a valid node name: use lowercase DNS labels (a-z, 0-9, '-', \
                 separated by '.', each 1 to 63 characters, not starting or ending with '-')"
            ));
        }
    }
    Ok(())
}

/// What `create_ca` and `create_node_cert` wrote.
#[derive(Debug)]
pub(crate) struct Written {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    pub(crate) not_after: OffsetDateTime,
}

/// Creates a cluster CA in `dir` (made if missing, mode 0700): `ca.pem` and `ca.key` (0600).
pub(crate) fn create_ca(dir: &Path, name: &str, days: u32, force: bool) -> Result<Written> {
    if name.trim().is_empty() || name.chars().any(char::is_control) {
        bail!("the CA name must be non-empty printable text, not {name:?}");
    }
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    make_dir(dir)?;
    refuse_existing(&[&cert_path, &key_path], force)?;

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating the CA key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + Duration::days(days.into());
    let cert = params
        .self_signed(&key)
        .context("signing the CA certificate")?;

    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600, force)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644, force)?;
    Ok(Written {
        cert: cert_path,
        key: key_path,
        not_after: params.not_after,
    })
}

/// Creates `out/NODE.pem` and `out/NODE.key` (0600): a certificate for node `node`, signed by the
/// CA in `ca_dir`, valid for `days` days but never past the CA's own expiry.
pub(crate) fn create_node_cert(
    ca_dir: &Path,
    node: &str,
    ips: &[IpAddr],
    out: &Path,
    days: u32,
    force: bool,
) -> Result<Written> {
    validate_node_name(node).map_err(anyhow::Error::msg)?;
    if ips.is_empty() {
        bail!("a node certificate needs at least one IP address (--ip)");
    }
    let ca_cert_path = ca_dir.join(CA_CERT_FILE);
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let ca_pem = read_ca_file(ca_dir, &ca_cert_path)?;
    let ca_key_pem = read_ca_file(ca_dir, &ca_key_path)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .with_context(|| format!("{} is not a PEM private key", ca_key_path.display()))?;
    let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .with_context(|| format!("{} is not a PEM certificate", ca_cert_path.display()))?;
    let ca_not_after = check_ca(&ca_der, &ca_key)
        .with_context(|| format!("{} is not a usable CA", ca_cert_path.display()))?;
    let issuer = Issuer::from_ca_cert_der(&ca_der, &ca_key)
        .with_context(|| format!("reading {}", ca_cert_path.display()))?;

    let cert_path = out.join(format!("{node}.pem"));
    let key_path = out.join(format!("{node}.key"));
    make_dir(out)?;
    refuse_existing(&[&cert_path, &key_path], force)?;

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating the node key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, node);
    params.subject_alt_names = vec![SanType::DnsName(
        node.try_into().context("the node name as a DNS name")?,
    )];
    params
        .subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = (now + Duration::days(days.into())).min(ca_not_after);
    let cert = params
        .signed_by(&key, &issuer)
        .context("signing the node certificate")?;

    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600, force)?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644, force)?;
    Ok(Written {
        cert: cert_path,
        key: key_path,
        not_after: params.not_after,
    })
}

/// The node a certificate stands for: its DNS subject alternative name (node certificates carry
/// exactly one; see `create_node_cert`).
pub(crate) fn node_name(cert: &CertificateDer<'_>) -> Result<String> {
    let (_, x509) =
        X509Certificate::from_der(cert).context("the certificate is not valid X.509 DER")?;
    let san = x509
        .subject_alternative_name()
        .context("the subject alternative names cannot be read")?
        .context("the certificate has no subject alternative names")?;
    let mut names = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::DNSName(name) => Some(*name),
        _ => None,
    });
    let name = names
        .next()
        .context("the certificate names no node (no DNS name)")?;
    if names.next().is_some() {
        bail!("the certificate names more than one node");
    }
    validate_node_name(name).map_err(anyhow::Error::msg)?;
    Ok(name.to_owned())
}

/// Checks that the CA certificate is a CA and belongs to the key; returns its expiry.
fn check_ca(ca: &CertificateDer<'_>, key: &KeyPair) -> Result<OffsetDateTime> {
    let (_, x509) = X509Certificate::from_der(ca).context("not valid X.509 DER")?;
    if !x509.is_ca() {
        bail!("the certificate is not a CA certificate");
    }
    if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        bail!("the CA key ({CA_KEY_FILE}) does not belong to the CA certificate");
    }
    let not_after = x509.validity().not_after.to_datetime();
    if not_after <= OffsetDateTime::now_utc() {
        bail!("the CA certificate expired at {not_after}");
    }
    Ok(not_after)
}

fn read_ca_file(ca_dir: &Path, path: &Path) -> Result<String> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == io::ErrorKind::NotFound => bail!(
            "no cluster CA in {}: {} does not exist (create one with `lbcluster tls ca create \
             --dir {}`)",
            ca_dir.display(),
            path.display(),
            ca_dir.display()
        ),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn make_dir(dir: &Path) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// Fails, naming every file that exists, unless `force`. Checked for all files before any is
/// written, so a refusal leaves nothing half-written.
fn refuse_existing(paths: &[&Path], force: bool) -> Result<()> {
    if force {
        return Ok(());
    }
    let existing: Vec<String> = paths
        .iter()
        .filter(|p| p.symlink_metadata().is_ok())
        .map(|p| p.display().to_string())
        .collect();
    if !existing.is_empty() {
        bail!(
            "refusing to overwrite {} (use --force to replace)",
            existing.join(" and ")
        );
    }
    Ok(())
}

/// Writes a new file with `mode`. With `force` an existing file is removed first, so the new
/// file gets `mode` even if the old one was more open (and a symlink is replaced, not followed).
fn write_file(path: &Path, contents: &[u8], mode: u32, force: bool) -> Result<()> {
    if force {
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", path.display()));
            }
            _ => {}
        }
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_node_names() {
        for ok in ["a", "node-1", "n1.lb.example", "0node"] {
            assert_eq!(validate_node_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "", "Node1", "-a", "a-", "a..b", "a.", "a_b", "ca", "10.0.0.1", "::1", "nöde",
        ] {
            assert!(validate_node_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_node_name(&"a".repeat(64)).is_err());
        assert!(validate_node_name(&["a"; 128].join(".")).is_err());
    }

    #[test]
    fn test_node_cert_names_the_node_and_not_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = create_ca(dir.path(), "test CA", 30, false).unwrap();
        let node = create_node_cert(
            dir.path(),
            "n1",
            &[
                "198.18.0.1".parse().unwrap(),
                "2001:db8::1".parse().unwrap(),
            ],
            dir.path(),
            3650,
            false,
        )
        .unwrap();
        // Clamped to the CA's expiry.
        assert!(node.not_after <= ca.not_after);
        let der = CertificateDer::from_pem_file(&node.cert).unwrap();
        assert_eq!(node_name(&der).unwrap(), "n1");
        let ca_der = CertificateDer::from_pem_file(&ca.cert).unwrap();
        assert!(node_name(&ca_der).is_err());
    }

    #[test]
    fn test_mismatched_ca_key_is_refused() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        create_ca(a.path(), "A", 30, false).unwrap();
        create_ca(b.path(), "B", 30, false).unwrap();
        fs::copy(b.path().join(CA_KEY_FILE), a.path().join(CA_KEY_FILE)).unwrap();
        let err = create_node_cert(
            a.path(),
            "n1",
            &["198.18.0.1".parse().unwrap()],
            a.path(),
            30,
            false,
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("does not belong"), "{err:#}");
    }
}
