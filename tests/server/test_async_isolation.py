"""The engine thread delivers one sequence's sampling failure to that request alone: its
stream raises EngineFailed, the others finish with the tokens they get without it."""

import asyncio

from moestream.engine import Engine, SamplingParams
from moestream.engine import engine as engine_module
from moestream.server.async_engine import AsyncEngine, EngineFailed
from tests.fixtures.models import get_fixture, sample_token_ids

PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def run_three(engine: Engine, prompts: list[list[int]]) -> list[list[int] | str]:
    async def main() -> list:
        async_engine = AsyncEngine(engine, asyncio.get_running_loop()).start()
        try:
            streams = [await async_engine.add(p, PARAMS) for p in prompts]

            async def tokens(stream) -> list[int] | str:
                out = []
                try:
                    async for event in stream:
                        out.append(event.token_id)
                except EngineFailed as exc:
                    return str(exc)
                return out

            return await asyncio.gather(*(tokens(s) for s in streams))
        finally:
            async_engine.stop()

    return asyncio.run(main())


def test_a_sampling_failure_reaches_only_its_own_stream(monkeypatch):
    fixture = get_fixture("olmoe")
    engine = Engine.from_gguf(fixture.gguf_path, ctx_size=256, max_batch=4, kernel_backend="torch")
    prompts = [sample_token_ids(fixture, n, seed=40 + n) for n in (3, 6, 5)]
    clean = run_three(engine, prompts)
    real_sample = engine_module.sample

    def failing(logits, seqs):
        if seqs[0].prompt_ids == prompts[1] and len(seqs[0].output_ids) == 2:
            raise ValueError("injected")
        return real_sample(logits, seqs)

    monkeypatch.setattr(engine_module, "sample", failing)
    got = run_three(engine, prompts)
    assert got[0] == clean[0] and got[2] == clean[2]
    assert isinstance(got[1], str) and "ValueError: injected" in got[1]
    assert engine.kv.usage == 0.0 and not engine.has_work()
