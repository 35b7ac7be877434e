//! Where the bucket is and how to reach it: settings from the policy and the environment, and the connection.

use std::path::PathBuf;
use std::time::Duration;

use super::{DEFAULT_TRANSFER_DEADLINE, Store, StoreError};
use crate::api::common::S3Location;

/// S3 connection settings resolved from the policy and the environment.
#[derive(Clone, Debug)]
pub struct S3Settings {
    pub bucket: String,
    pub region: String,
    pub endpoint: Option<String>,
    pub force_path_style: bool,
    /// Static keys (from a Secret via the environment, or from Vault). `None` uses the ambient AWS chain.
    pub static_keys: Option<(String, String, Option<String>)>,
    /// Extra CA certificates (PEM) to trust for the endpoint.
    pub ca_pem: Option<Vec<u8>>,
    /// Attempts per request inside the SDK (its standard retry mode); [`with_retries`] retries on top of that
    /// until `transfer_deadline`.
    pub max_attempts: u32,
    /// How long one transfer may keep retrying through failures of the endpoint (`destination.transferDeadline`).
    pub transfer_deadline: Duration,
}

impl S3Settings {
    /// Settings from a policy's destination; keys come from `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` (set
    /// from the policy's Secret by the job) or the ambient chain.
    pub fn from_location(loc: &S3Location) -> Self {
        let mut settings = Self::from_env(&loc.bucket, &loc.region, loc.endpoint.clone(), loc.force_path_style);
        // The CRD admits only durations of at least 1s.
        if let Ok(d) = crate::api::common::parse_duration(&loc.transfer_deadline) {
            settings.transfer_deadline = d;
        }
        settings
    }

    /// Settings for a bucket, with keys and CA from the environment as described at [`Self::from_location`].
    pub fn from_env(bucket: &str, region: &str, endpoint: Option<String>, force_path_style: bool) -> Self {
        let static_keys = match (std::env::var("AWS_ACCESS_KEY_ID"), std::env::var("AWS_SECRET_ACCESS_KEY")) {
            (Ok(a), Ok(s)) if !a.is_empty() && !s.is_empty() => Some((a, s, std::env::var("AWS_SESSION_TOKEN").ok())),
            _ => None,
        };
        // The CA from destination.caSecretRef (PEM in the environment), or a file for runs by hand.
        let ca_pem = std::env::var("CRMGUARD_S3_CA_CERT")
            .ok()
            .filter(|p| !p.trim().is_empty())
            .map(String::into_bytes)
            .or_else(|| std::env::var("CRMGUARD_S3_CA_FILE").ok().and_then(|p| std::fs::read(p).ok()));
        S3Settings {
            bucket: bucket.to_string(),
            region: region.to_string(),
            endpoint,
            force_path_style,
            static_keys,
            ca_pem,
            max_attempts: 2,
            transfer_deadline: DEFAULT_TRANSFER_DEADLINE,
        }
    }
}

/// Why no S3 credentials can be found without asking a cloud metadata service, or `None` when some source is
/// there. The SDK's chain would otherwise end at the instance metadata address (169.254.169.254), which exists
/// only on a cloud VM, and fail after timeouts with a message about the endpoint. That last resort is kept only
/// for AWS itself (no custom endpoint) when `AWS_EC2_METADATA_DISABLED` is not `true`.
fn missing_credentials(custom_endpoint: bool) -> Option<String> {
    let set = |v: &str| std::env::var(v).is_ok_and(|x| !x.trim().is_empty());
    let (access, secret) = (set("AWS_ACCESS_KEY_ID"), set("AWS_SECRET_ACCESS_KEY"));
    if access != secret {
        let (have, lack) = if access {
            ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        } else {
            ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID")
        };
        return Some(format!(
            "S3 credentials are incomplete: {have} is set but {lack} is not. The Secret named in \
             destination.credentials.secretRef must hold both keys"
        ));
    }
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let files = home.is_some_and(|h| h.join(".aws/credentials").exists() || h.join(".aws/config").exists());
    let ambient = files
        || [
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_PROFILE",
        ]
        .into_iter()
        .any(set)
        || set("AWS_SHARED_CREDENTIALS_FILE")
        || set("AWS_CONFIG_FILE");
    let metadata = !custom_endpoint && std::env::var("AWS_EC2_METADATA_DISABLED").map_or(true, |v| v != "true");
    (!ambient && !metadata).then(|| {
        "no S3 credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set and no other source is \
         configured (web identity, container credentials, an AWS profile). Name a Secret holding both keys in the \
         policy's destination.credentials.secretRef (the job gets them as environment variables), or Vault KV \
         credentials in destination.credentials.vault; by hand, export the two variables"
            .to_string()
    })
}

impl Store {
    /// Connects to S3.
    pub async fn s3(settings: &S3Settings) -> Result<Store, StoreError> {
        use aws_smithy_http_client::tls::{self, TlsContext, TrustStore, rustls_provider::CryptoMode};
        let mut http = aws_smithy_http_client::Builder::new().tls_provider(tls::Provider::Rustls(CryptoMode::Ring));
        if let Some(pem) = &settings.ca_pem {
            let trust = TrustStore::empty().with_native_roots(true).with_pem_certificate(pem.clone());
            http = http.tls_context(TlsContext::builder().with_trust_store(trust).build().map_err(|e| {
                StoreError::Config(format!("the S3 CA certificate (CRMGUARD_S3_CA_FILE) cannot be used: {e}"))
            })?);
        }
        if settings.static_keys.is_none()
            && let Some(missing) = missing_credentials(settings.endpoint.is_some())
        {
            return Err(StoreError::Credentials(missing));
        }
        let http = http.build_https();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(http)
            .region(aws_config::Region::new(settings.region.clone()))
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(settings.max_attempts.max(1)))
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .operation_attempt_timeout(Duration::from_secs(300))
                    .build(),
            );
        if let Some((access, secret, session)) = &settings.static_keys {
            loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
                access.clone(),
                secret.clone(),
                session.clone(),
                None,
                "crmguard",
            ));
        }
        let shared = loader.load().await;
        let mut conf = aws_sdk_s3::config::Builder::from(&shared).force_path_style(settings.force_path_style);
        if let Some(ep) = &settings.endpoint {
            conf = conf.endpoint_url(ep.trim_end_matches('/'));
        }
        Ok(Store::S3 {
            client: aws_sdk_s3::Client::from_conf(conf.build()),
            bucket: settings.bucket.clone(),
            deadline: settings.transfer_deadline,
        })
    }
}
