"""The per-step token math of the decoder: vectorised sampling, the prompt's own logprobs, and
bounded stop-string checks."""

from __future__ import annotations

GREEDY_BELOW = 1e-5  # a temperature under this decodes greedily (dividing logits by it would overflow)


def sample(logits, reqs: list, gens: list):
    """Each row's next token, its logprob, and its top logprobs (rows that asked for them; when
    no row asks for logprobs, the logprobs are zeros and go unread).

    Greedy rows take the argmax. The others divide by their temperature, keep their top-p
    nucleus, and draw by inverse CDF with one uniform number from their own generator.
    """
    import torch

    toks = torch.argmax(logits, dim=-1)
    temps = torch.tensor([r.temperature for r in reqs], dtype=logits.dtype)
    rows = torch.nonzero(temps >= GREEDY_BELOW).squeeze(1)
    if len(rows):
        top_p = torch.tensor([reqs[i].top_p for i in rows.tolist()], dtype=logits.dtype)
        probs = torch.softmax(logits[rows] / temps[rows, None], dim=-1)
        sp, si = torch.sort(probs, dim=-1, descending=True)
        sp = sp * ((torch.cumsum(sp, dim=-1) - sp) < top_p[:, None])
        cdf = torch.cumsum(sp, dim=-1)
        u = torch.stack([torch.rand((), generator=gens[i], dtype=cdf.dtype) for i in rows.tolist()]) * cdf[:, -1]
        pick = torch.searchsorted(cdf, u[:, None], right=True).clamp(max=cdf.shape[-1] - 1)
        toks[rows] = si.gather(1, pick).squeeze(1)
    tops = [None] * len(reqs)
    if all(r.logprobs is None for r in reqs):  # nobody reads them: no full-vocabulary softmax this step
        return toks, torch.zeros(len(reqs)), tops
    logp = torch.log_softmax(logits, dim=-1)
    lps = logp.gather(1, toks[:, None]).squeeze(1)
    k = max((r.logprobs or 0) for r in reqs)
    if k:
        vals, idx = torch.topk(logp, k, dim=-1)
        for i, r in enumerate(reqs):
            if r.logprobs:
                tops[i] = {int(t): float(v) for v, t in zip(vals[i, :r.logprobs], idx[i, :r.logprobs])}
    return toks, lps, tops


def stop_hit(row, stops: list[str]) -> str | None:
    """Find a stop string in the text new since the last check (plus a stop's length of overlap)."""
    for stop in stops:
        cut = row.text.find(stop, max(0, row.scanned - len(stop)))
        if cut >= 0:
            row.text = row.text[:cut]
            return "stop"
    row.scanned = max(0, len(row.text) - 4)  # a re-decode may rewrite the last few characters
    return None


def safe_len(text: str, stops: list[str]) -> int:
    n = len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                n = min(n, len(text) - k)
                break
    return n


def prompt_logprobs(m, ids: list[int], k: int | None) -> list[dict]:
    """Each prompt token with its logprob given the tokens before it (the first has none), and
    its top ``k`` alternatives: what ``echo`` with ``logprobs`` returns for the prompt."""
    import torch

    dev = next(m.model.parameters()).device
    with torch.no_grad():
        logits = m.model(input_ids=torch.tensor([ids], device=dev)).logits[0, :-1].float().cpu()
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(1, torch.tensor(ids[1:], dtype=torch.long)[:, None]).squeeze(1).tolist()
    vals, idx = torch.topk(logp, k) if k else (None, None)
    out = [{"token": m.tokenizer.decode([ids[0]]), "logprob": None, "top": None}]
    for i, t in enumerate(ids[1:]):
        top = {int(x): float(v) for v, x in zip(vals[i], idx[i])} if k else None
        out.append({"token": m.tokenizer.decode([t]), "logprob": picked[i], "top": top})
    return out
