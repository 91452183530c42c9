//! A throwaway certificate authority and a localhost certificate, made at start and never
//! written anywhere but the stack's runtime directory (ECDSA P-256, 90 days, as Mozilla's
//! modern profile recommends).

use rcgen::{
    BasicConstraints, CertificateParams, CrlDistributionPoint, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use std::path::{Path, PathBuf};

pub struct Certificates {
    /// The CA certificate clients trust.
    pub ca: PathBuf,
    /// Leaf + CA chain, and the leaf's key (mode 0600), for nginx.
    pub chain: PathBuf,
    pub key: PathBuf,
    /// base64 SHA-256 of the CA's SubjectPublicKeyInfo: how Chromium is told to trust the CA
    /// (`--ignore-certificate-errors-spki-list`), having no flag for a CA file.
    pub ca_spki_sha256: String,
}

pub fn generate(dir: &Path) -> anyhow::Result<Certificates> {
    let now = time::OffsetDateTime::now_utc();
    let validity = |params: &mut CertificateParams| {
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(90);
    };

    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "pageviews local test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca);
    let ca_cert = ca.self_signed(&ca_key)?;
    let ca_spki_sha256 = {
        use base64::Engine;
        use rcgen::PublicKeyData;
        use sha2::Digest;
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(ca_key.subject_public_key_info()))
    };
    let issuer = Issuer::new(ca, ca_key);

    let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()])?;
    leaf.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
    leaf.distinguished_name.push(DnType::CommonName, "localhost");
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.use_authority_key_identifier_extension = true;
    // testssl.sh rates a certificate without any revocation URL as HIGH; a local one suffices.
    leaf.crl_distribution_points = vec![CrlDistributionPoint {
        uris: vec!["http://localhost/ca.crl".into()],
    }];
    validity(&mut leaf);
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;

    let certificates = Certificates {
        ca: dir.join("ca.pem"),
        chain: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        ca_spki_sha256,
    };
    std::fs::write(&certificates.ca, ca_cert.pem())?;
    std::fs::write(&certificates.chain, format!("{}{}", leaf_cert.pem(), ca_cert.pem()))?;
    crate::write_private(&certificates.key, leaf_key.serialize_pem())?;
    Ok(certificates)
}
