"""Serving M1 to many clients at once: the slot engine (:mod:`.engine`), its compiled steps (:mod:`.steps`),
the exact prefix cache (:mod:`.prefix_cache`) and the OpenAI-compatible HTTP server (:mod:`.server`,
``m1 serve``)."""
