#!/usr/bin/env python3
"""A small Python client for moe-cluster (moe.v1.Router), using Debian's python3-grpcio.

Stubs are generated at build time into build/python (make build); run as
    PYTHONPATH=build/python python3 client/python/moe_client.py --router HOST:PORT [--tokens N]

It prints the cluster's model, sends N random tokens through Infer, and prints the routing of
the first few tokens. The functions below are the library part: import moe_client and call
connect(), cluster_info(), infer().
"""
import argparse
import sys

import grpc
import numpy as np

from moe.v1 import router_pb2, router_pb2_grpc, tensor_pb2


def connect(address):
    channel = grpc.insecure_channel(address, options=[
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 64 << 20)])
    return router_pb2_grpc.RouterStub(channel)


def to_tensor(array):
    array = np.ascontiguousarray(array, dtype="<f4")
    return tensor_pb2.Tensor(shape=list(array.shape), dtype=tensor_pb2.FLOAT32,
                             data=array.tobytes())


def from_tensor(tensor):
    if tensor.dtype == tensor_pb2.BFLOAT16:
        half = np.frombuffer(tensor.data, dtype="<u2").astype(np.uint32) << 16
        return half.view(np.float32).reshape(tensor.shape)
    return np.frombuffer(tensor.data, dtype="<f4").reshape(tensor.shape)


def cluster_info(stub, timeout=10):
    return stub.GetClusterInfo(router_pb2.GetClusterInfoRequest(), timeout=timeout)


def infer(stub, tokens, request_id="py", timeout=30):
    """Returns (output [N, d_model], expert_ids [N, k], weights [N, k], stats)."""
    resp = stub.Infer(router_pb2.InferRequest(request_id=request_id, tokens=to_tensor(tokens),
                                              return_routing=True), timeout=timeout)
    k = resp.routing.top_k
    ids = np.array(resp.routing.expert_ids, dtype=np.int32).reshape(-1, k)
    weights = np.array(resp.routing.weights, dtype=np.float32).reshape(-1, k)
    return from_tensor(resp.output), ids, weights, resp.stats


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--router", required=True, help="HOST:PORT of moe-router")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", help="write tokens and output to this .npz file")
    args = ap.parse_args()
    stub = connect(args.router)
    try:
        info = cluster_info(stub)
    except grpc.RpcError as e:
        print(f"moe_client.py: cannot reach {args.router}: {e.code().name}: {e.details()}",
              file=sys.stderr)
        return 1
    print(f"model: {info.num_experts} experts, d_model {info.d_model}, top-{info.top_k}, "
          f"placement {info.placement_strategy} v{info.placement_version}, "
          f"{sum(s.healthy for s in info.shards)}/{len(info.shards)} shards up")
    x = np.random.default_rng(args.seed).uniform(-1, 1, (args.tokens, info.d_model))
    try:
        y, ids, weights, stats = infer(stub, x.astype(np.float32))
    except grpc.RpcError as e:
        print(f"moe_client.py: Infer failed: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print(f"output {y.shape}, dropped {stats.dropped_assignments}, "
          f"load_balance_loss {stats.load_balance_loss:.4f}")
    for t in range(min(4, args.tokens)):
        routes = ", ".join(f"expert {e} w={w:.3f}" for e, w in zip(ids[t], weights[t]))
        print(f"token {t}: {routes}")
    if args.save:
        np.savez(args.save, tokens=x.astype(np.float32), output=y, expert_ids=ids, weights=weights)
    return 0


if __name__ == "__main__":
    sys.exit(main())
