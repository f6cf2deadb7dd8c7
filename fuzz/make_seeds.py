#!/usr/bin/env python3
"""Writes the seed corpora of the structure-aware fuzzers (fuzz/corpus/{router_request,dispatch,
collective}) from text-format messages, with protoc --encode. Run from the repository root:
    /usr/bin/python3 fuzz/make_seeds.py
"""
import os
import struct
import subprocess


def fbytes(values, bf16=False):
    raw = b"".join(struct.pack("<f", v)[2:] if bf16 else struct.pack("<f", v) for v in values)
    return "".join(f"\\{b:03o}" for b in raw)


def tensor(rows, cols, bf16=False, seed=1):
    vals = [((i * 7 + seed) % 11 - 5) / 4 for i in range(rows * cols)]
    return (f"shape: {rows} shape: {cols} dtype: {'BFLOAT16' if bf16 else 'FLOAT32'} "
            f"data: \"{fbytes(vals, bf16)}\"")


def encode(msg_type, proto, includes, text, out):
    args = ["protoc", f"--encode={msg_type}"] + [f"-I{i}" for i in includes] + [proto]
    data = subprocess.run(args, input=text.encode(), capture_output=True, check=True).stdout
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "wb") as f:
        f.write(data)


D = 8  # fuzz/fuzz_servers.h's d_model
router = {
    "valid_fp32": f"request_id: \"a\" tokens {{ {tensor(3, D)} }}",
    "valid_bf16_routing": f"request_id: \"b\" return_routing: true tokens {{ {tensor(2, D, True)} }}",
    "wrong_d_model": f"tokens {{ {tensor(3, D - 1)} }}",
    "one_token": f"tokens {{ {tensor(1, D, seed=5)} }}",
}
for name, text in router.items():
    encode("moe.v1.InferRequest", "moe/v1/router.proto", ["proto"], text,
           f"fuzz/corpus/router_request/{name}")

dispatch = {
    "two_experts": f"batch_id: 1 rows {{ {tensor(4, D)} }} experts {{ expert: 0 rows: 0 rows: 1 }} "
                   "experts { expert: 3 rows: 2 rows: 3 rows: 0 } timeout_ms: 1000",
    "bf16_out": f"batch_id: 2 rows {{ {tensor(2, D, True)} }} experts {{ expert: 1 rows: 1 }} "
                "output_dtype: BFLOAT16",
    "unknown_expert": f"batch_id: 3 rows {{ {tensor(1, D)} }} experts {{ expert: 9 rows: 0 }}",
}
for name, text in dispatch.items():
    encode("moe.v1.DispatchRequest", "moe/v1/expert_shard.proto", ["proto"], text,
           f"fuzz/corpus/dispatch/{name}")

# World 2, 10 elements: rank 0 receives segment 1 (offset 5, 5 elements) in the reduce-scatter
# step and segment 0 (offset 0) in the all-gather step.
collective = {
    "ring2_fp32": "world: 0 rank: 0 length: 10 generation: 1 max_chunk: 1023 "
                  f"chunks {{ group: \"fuzz\" generation: 1 from_rank: 1 step: 0 piece: 0 offset: 5 count: 5 payload: \"{fbytes([1] * 5)}\" }} "
                  f"chunks {{ group: \"fuzz\" generation: 1 from_rank: 1 step: 1 piece: 0 offset: 0 count: 5 payload: \"{fbytes([2] * 5)}\" }}",
    "ring3_bf16": "world: 1 rank: 2 length: 9 generation: 4 bf16: true max_chunk: 1 "
                  f"chunks {{ group: \"fuzz\" generation: 4 step: 0 piece: 0 offset: 3 count: 3 wire: 1 payload: \"{fbytes([1] * 3, True)}\" }}",
    "old_generation": "world: 0 rank: 1 length: 4 generation: 7 "
                      f"chunks {{ group: \"fuzz\" generation: 6 step: 0 offset: 0 count: 2 payload: \"{fbytes([1] * 2)}\" }}",
}
for name, text in collective.items():
    encode("moe.fuzz.CollectiveInput", "fuzz_inputs.proto", ["fuzz", "proto"], text,
           f"fuzz/corpus/collective/{name}")
print("wrote", len(router) + len(dispatch) + len(collective), "seeds")
