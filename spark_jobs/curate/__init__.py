"""Curation: the filters that run on every document before tokenization.

A filter is one small class with one method, :meth:`Filter.apply`, and its own typed config.
It reads a :class:`Doc` and returns ``None`` to keep it (possibly rewriting ``doc.text``, as
the scrubbers do) or a short reason to remove it. ``curate.filters`` in the tokenize config
is a preset name (``code``, ``web``, ``none``) or a list of filters, each a name or a
one-key mapping ``{name: {key: value}}``.
"""
