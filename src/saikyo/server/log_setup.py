"""What the log may carry: the S3 client's libraries stay at WARNING, and credentials never appear.

botocore's and urllib3's debug lines print every request's headers: the access key id in the
Authorization header's Credential, the session token, presigned URLs' signatures. `--log-level debug`
is for saikyo's own lines, so those libraries stay at WARNING unless `s3_debug_log` asks for them; every
line that reaches the log then passes through `RedactCredentials` all the same.
"""

from __future__ import annotations

import logging
import os
import re

from saikyo.settings import Settings

LIBRARIES = ("botocore", "boto3", "s3transfer", "urllib3")
REDACTED = "<redacted>"

# Credential=AKIA.../date/region/s3/aws4_request, X-Amz-Credential=AKIA...%2F..., Signature=..., and the
# session token as a header ('X-Amz-Security-Token': b'...') or a query parameter.
_PATTERNS = (
    re.compile(r"(Credential=)[^\s,'\"&/%]+", re.I),
    re.compile(r"(Signature=)[0-9a-f]+", re.I),
    re.compile(r"(x-amz-security-token['\"]?\s*[:=]\s*b?['\"]?)[^\s'\",&]+", re.I),
    re.compile(r"(aws_(?:access_key_id|secret_access_key|session_token)['\"]?\s*[:=]\s*['\"]?)[^\s'\",&]+", re.I),
)
_SECRET_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def redact_credentials(text: str) -> str:
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    for name in _SECRET_VARIABLES:  # whatever form a library prints them in
        value = os.environ.get(name, "")
        if len(value) >= 8:
            text = text.replace(value, REDACTED)
    return text


class RedactCredentials(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_credentials(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def configure_library_logging(settings: Settings) -> None:
    """Process-wide: the libraries' levels, and the redaction on every handler the root logger has."""
    level = logging.DEBUG if settings.s3_debug_log else logging.WARNING
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(level)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactCredentials) for f in handler.filters):
            handler.addFilter(RedactCredentials())
