import os, sys
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))
import jax, jax.numpy as jnp, numpy as np
from dsv4jax.pallas.sparse_attention import kernel as K
H, d, N, bk = 64, int(os.environ.get("D", 512)), 200, 32
key = jax.random.key(1)
ks = jax.random.split(key, 4)
q = jax.random.normal(ks[0], (1, H, d), jnp.bfloat16)
kv = jax.random.normal(ks[1], (1, N, d), jnp.bfloat16)
idx = (jnp.arange(64, dtype=jnp.int32) * 3 + 5)[None]
sink = jnp.zeros((1, H), jnp.float32)
call = K._build(1, 1, H, d, N, 1, 64, jnp.bfloat16, d ** -0.5, bk, None, debug=True)
RW = min(d, 256)
out, dt, ds = jax.block_until_ready(call(q, kv.reshape(1, N, d // RW, RW), idx, sink))
rows = kv[0, idx[0, :bk]].astype(jnp.float32)
print("tiled vs rows err", float(jnp.abs(dt[0].astype(jnp.float32) - rows).max()))
for r in range(3):
    hit = [int(i) for i in range(N) if bool(jnp.all(kv[0, i] == dt[0, r]))]
    print("tiled row", r, "matches kv rows", hit, "expected", int(idx[0, r]))
s_full = q[0].astype(jnp.float32) @ rows.T
s_half = q[0, :, : d // 2].astype(jnp.float32) @ rows[:, : d // 2].T
print("S_own(h0) vs half-dot err", float(jnp.abs(ds[0] - s_half).max()), "scale", float(jnp.abs(s_half).max()))
print("S_own vs transposed?", float(jnp.abs(ds[0] - s_half.T[:H] if bk == H else 0).max()) if bk == H else "n/a")
from dsv4jax.pallas.sparse_attention.reference import sparse_attention_reference
ref = sparse_attention_reference(q[None].astype(jnp.float32), kv.astype(jnp.float32), idx[None], sink[0], d ** -0.5)[0]
print("out rel", float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref)))
