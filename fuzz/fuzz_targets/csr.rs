//! The controller's CSR handling: `check_csr` (what `Certify` applies to a caller's CSR) and signing by a
//! test CA (`Issuer::sign`, the same call the controller makes, without a store). Input: a PEM CSR when it
//! starts with `-----BEGIN`, otherwise DER bytes wrapped into PEM here, so mutations reach the ASN.1.
#![no_main]

use std::{
    sync::{LazyLock, Mutex},
    time::Duration,
};

use base64::Engine;
use libfuzzer_sys::fuzz_target;
use quicmesh_controller::issuer::{Issuer, check_csr};
use quicmesh_transport::identity::{SpiffeId, inspect};
use time::OffsetDateTime;

static GRANTED: LazyLock<SpiffeId> =
    LazyLock::new(|| SpiffeId::new("mesh.local", "shop", "cart").expect("granted id"));

static ISSUER: LazyLock<Mutex<Issuer>> = LazyLock::new(|| {
    let root = Issuer::generate_root("mesh.local", OffsetDateTime::now_utc()).expect("test root");
    Mutex::new(Issuer::from_records(vec![root]).expect("test issuer"))
});

fn as_pem(data: &[u8]) -> Option<String> {
    if data.starts_with(b"-----BEGIN") {
        return std::str::from_utf8(data).ok().map(str::to_owned);
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(data);
    let mut pem = String::from("-----BEGIN CERTIFICATE REQUEST-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).ok()?);
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE REQUEST-----\n");
    Some(pem)
}

fuzz_target!(|data: &[u8]| {
    let Some(pem) = as_pem(data) else { return };
    let checked = check_csr(&pem, &GRANTED);
    let mut issuer = ISSUER.lock().unwrap_or_else(|e| e.into_inner());
    let signed = issuer.sign(
        &pem,
        &GRANTED,
        OffsetDateTime::now_utc(),
        Duration::from_secs(60),
    );
    if let Ok((leaf, _root)) = signed {
        assert!(checked.is_ok(), "signed a CSR that check_csr refused");
        // The leaf carries exactly the granted identity, whatever the CSR asked for.
        let info = inspect::CertInfo::from_pem(&leaf.cert_pem).expect("issued leaf parses");
        assert_eq!(info.spiffe_id, *GRANTED);
        assert_eq!(leaf.spiffe_id, *GRANTED);
        // ...and exactly the CSR's public key.
        assert_eq!(
            spki_of_cert(&leaf.cert_pem),
            spki_of_csr(&pem),
            "issued leaf does not carry the CSR's public key"
        );
    }
});

/// The key of the CSR block the controller reads (the same PEM reader as `check_csr`).
fn spki_of_csr(pem: &str) -> Vec<u8> {
    use x509_parser::prelude::*;
    let der = quicmesh_transport::identity::pem::sole_block(
        pem.as_bytes(),
        rustls::pki_types::pem::SectionKind::Csr,
    )
    .expect("the one CSR block");
    let (_, csr) = X509CertificationRequest::from_der(&der).expect("CSR DER");
    csr.certification_request_info.subject_pki.raw.to_vec()
}

fn spki_of_cert(pem: &str) -> Vec<u8> {
    use x509_parser::prelude::*;
    let der = inspect::first_cert_der(pem).expect("leaf PEM");
    let (_, cert) = X509Certificate::from_der(&der).expect("leaf DER");
    cert.tbs_certificate.subject_pki.raw.to_vec()
}
