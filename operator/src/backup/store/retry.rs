//! Which failed requests are retried (the endpoint unreachable, 5xx, throttling) and for how long.

use std::time::Duration;

use super::{StoreError, s3_err};

/// The transfer deadline when the policy names none.
pub const DEFAULT_TRANSFER_DEADLINE: Duration = Duration::from_secs(300);

/// Whether retrying can fix a failed request: the endpoint could not be reached or timed out, the connection
/// broke, or it answered 5xx, 429 or 408. Credentials, permissions and missing buckets cannot be retried away.
fn transient<E>(e: &aws_sdk_s3::error::SdkError<E>) -> bool {
    use aws_sdk_s3::error::SdkError;
    match e {
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => true,
        SdkError::DispatchFailure(d) => {
            use aws_smithy_types::retry::ErrorKind;
            d.is_io()
                || d.is_timeout()
                || matches!(
                    d.as_other(),
                    Some(ErrorKind::TransientError | ErrorKind::ServerError | ErrorKind::ThrottlingError)
                )
        }
        SdkError::ServiceError(s) => {
            let status = s.raw().status().as_u16();
            status >= 500 || status == 429 || status == 408
        }
        _ => false,
    }
}

/// The wait before retry `n` (0-based): 0.5 s doubling up to 15 s, shortened at random by up to half so that
/// parts and jobs do not retry in step.
pub(super) fn retry_delay(n: u32) -> Duration {
    let base = Duration::from_millis(500).saturating_mul(1u32 << n.min(5)).min(Duration::from_secs(15));
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    base.mul_f64(1.0 - f64::from(nanos % 500) / 1000.0)
}

/// Runs `attempt` until it succeeds, fails in a way retrying cannot fix, or `deadline` has passed since its
/// first failure.
pub async fn with_retries<T, E, F, Fut>(
    deadline: Duration,
    op: &'static str,
    key: &str,
    mut attempt: F,
) -> Result<T, aws_sdk_s3::error::SdkError<E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, aws_sdk_s3::error::SdkError<E>>>,
    E: std::fmt::Debug + std::fmt::Display,
{
    let mut first_failure: Option<std::time::Instant> = None;
    let mut n = 0;
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if transient(&e) => {
                let since = *first_failure.get_or_insert_with(std::time::Instant::now);
                let wait = retry_delay(n);
                if since.elapsed() + wait > deadline {
                    return Err(e);
                }
                if let StoreError::S3 { message, .. } = s3_err(op, key, &e) {
                    tracing::warn!(
                        op,
                        key,
                        retry_in_ms = wait.as_millis() as u64,
                        "S3 request failed, retrying: {message}"
                    );
                }
                tokio::time::sleep(wait).await;
                n += 1;
            }
            Err(e) => return Err(e),
        }
    }
}
