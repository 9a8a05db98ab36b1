"""The Azure SDK's loggers, set to WARNING where the app starts (function_app.py).

The Functions worker sends every log record that reaches the root logger to the host, whatever
the logger's name, so host.json's per-category logLevel filters none of them: without this,
azure-core's HTTP logging policy sends each request and response (URLs carrying secret names) to
Application Insights at INFO. The app setting ROTATION_SDK_LOG_LEVEL (DEBUG, INFO, WARNING, ERROR)
sets another level for them, to debug the SDK.
"""

import logging
import os
from collections.abc import Mapping

LEVEL_SETTING = "ROTATION_SDK_LOG_LEVEL"
SDK_LOGGERS = (
    "azure.core",
    "azure.core.pipeline.policies.http_logging_policy",
    "azure.identity",
    "azure.keyvault",
    "azure.data.tables",
    "azure.storage",
    "azure.mgmt",
    "azure.eventgrid",
    "msal",
    "urllib3",
)
_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "INFORMATION": logging.INFO}
_LEVELS |= {"WARNING": logging.WARNING, "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}


def sdk_log_level(env: Mapping[str, str]) -> int:
    """The level the setting names; WARNING when it is absent or names no level."""
    return _LEVELS.get(env.get(LEVEL_SETTING, "").strip().upper(), logging.WARNING)


def quiet_sdk_loggers(env: Mapping[str, str] | None = None) -> int:
    level = sdk_log_level(os.environ if env is None else env)
    for name in SDK_LOGGERS:
        logging.getLogger(name).setLevel(level)
    return level
