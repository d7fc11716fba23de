"""Schemathesis hooks for the serving fuzz test (loaded through SCHEMATHESIS_HOOKS): generated
bodies name the served model, so the fuzzer reaches the decoder instead of the 404 for an
unknown model on nearly every request."""

import os

import schemathesis


@schemathesis.hook
def map_body(context, body):
    if isinstance(body, dict):
        body["model"] = os.environ["LMPIPE_FUZZ_MODEL"]
    return body
