"""Load-adaptive speculation: measure this machine and model, and write vLLM's `num_speculative_tokens_per_batch_size`
schedule (`python -m vispec_vllm.calibrate`, see `__main__`). `plan` is the pure planning step; `measure` and
`probes` time an in-process engine; `profile` splits a decode step into its parts."""
