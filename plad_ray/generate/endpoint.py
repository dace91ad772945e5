"""A black-box teacher: any OpenAI-compatible HTTP server, via ray.data.llm's HTTP processor.

Only text crosses: the server may run any model with any tokenizer. ray.data.llm owns
the request workers, per-worker rate limits and retries with exponential backoff (on
408/429/5xx and connection errors). The API key is read from an environment variable
inside each request worker when it opens its session; it is never in the config, the
Ray task arguments, the logs or the outputs.
"""

import json
import os
import urllib.error
import urllib.request

from plad_ray import console
from plad_ray.config import EndpointConfig
from plad_ray.errors import ConfigError, DataError

REQUEST_WORKER_CPUS = 0.25


class _Session:
    """aiohttp session factory for the request workers: the Authorization header comes from the env."""

    def __init__(self, api_key_env: str | None, timeout_s: float):
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s

    def __call__(self):
        import aiohttp

        headers = {}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise RuntimeError(f"teacher.endpoint.api_key_env: ${self.api_key_env} is not set on this Ray worker; "
                                   "set it in the cluster's environment or the job's runtime_env env_vars")
            headers["Authorization"] = f"Bearer {key}"
        return aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=self.timeout_s))


def api_key(endpoint: EndpointConfig) -> str | None:
    if not endpoint.api_key_env:
        return None
    key = os.environ.get(endpoint.api_key_env)
    if not key:
        raise ConfigError(f"config key teacher.endpoint.api_key_env: environment variable {endpoint.api_key_env} is "
                          "not set; export it (the key itself never goes in a config)")
    return key


def check_endpoint(endpoint: EndpointConfig, model: str) -> None:
    """Before generation: the server answers, accepts the key, and serves `model`."""
    base = endpoint.url.rstrip("/").rsplit("/chat/completions", 1)[0].rsplit("/completions", 1)[0]
    request = urllib.request.Request(f"{base}/models")
    key = api_key(endpoint)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            served = [m.get("id") for m in json.loads(response.read()).get("data", [])]
    except urllib.error.HTTPError as e:
        hint = "; check the key in $" + str(endpoint.api_key_env) if e.code in (401, 403) else ""
        raise DataError(f"teacher endpoint {base}/models: HTTP {e.code} {e.reason}{hint}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"teacher endpoint {base}: not reachable ({getattr(e, 'reason', e)}); "
                        "check teacher.endpoint.url and that the server is up") from None
    if served and model not in served:
        raise DataError(f"config key teacher.model: the endpoint serves {', '.join(map(str, served))}, "
                        f"not {model!r}; set teacher.model to the served model name")


def build_endpoint_processor(endpoint: EndpointConfig, batch_size: int, preprocess, postprocess):
    """A processor sending each row's `payload` to the endpoint; rows come back with `http_response`."""
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    config = HttpRequestProcessorConfig(
        url=endpoint.url,
        batch_size=batch_size,
        concurrency=endpoint.concurrency,
        qps=endpoint.qps,
        max_retries=endpoint.max_retries,
        base_retry_wait_time_in_s=endpoint.retry_wait_s,
        session_factory=_Session(endpoint.api_key_env, endpoint.timeout_s),
        # Request workers wait on the network, not the CPU.
        http_request_stage={"num_cpus": REQUEST_WORKER_CPUS, "concurrency": endpoint.concurrency},
    )
    processor = build_processor(config, preprocess=preprocess, postprocess=postprocess)
    console.route_libraries()  # ray.llm sets up its loggers on import
    return processor


def read_response(response: dict, stop_configured: bool = False) -> dict:
    """text, num_tokens, finish_reason (eos | stop | length) of an OpenAI completions or chat response.

    OpenAI's "stop" covers both the end-of-sequence token and a stop string. vLLM's server
    tells them apart with `stop_reason` (null or a token id: EOS; a string: that stop
    string); a server without it ended on EOS unless a stop string was configured.
    """
    choice = response["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    usage = response.get("usage") or {}
    if choice.get("finish_reason") == "length":
        reason = "length"
    elif "stop_reason" in choice:
        reason = "stop" if isinstance(choice["stop_reason"], str) else "eos"
    else:
        reason = "stop" if stop_configured else "eos"
    return {"text": text or "", "num_tokens": int(usage.get("completion_tokens") or 0), "finish_reason": reason}
