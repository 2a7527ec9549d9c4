/// Softmax of each row in place over its first `valid` entries (the rest set to 0).
/// row is (n); valid ≥ 1.
@inline(__always)
func softmaxRow(_ row: UnsafeMutablePointer<Float>, n: Int, valid: Int) {
    var mx = -Float.infinity
    for j in 0..<valid { mx = max(mx, row[j]) }
    let m8 = SIMD8<Float>(repeating: mx)
    var s8 = SIMD8<Float>(repeating: 0)
    var j = 0
    while j + 8 <= valid { let e = exp8(load8(row + j) - m8); store8(row + j, e); s8 += e; j += 8 }
    var s = s8.sum()
    while j < valid { var x = SIMD8<Float>(repeating: 0); x[0] = row[j] - mx; row[j] = exp8(x)[0]; s += row[j]; j += 1 }
    let inv = 1 / s
    for k in 0..<valid { row[k] *= inv }
    for k in valid..<n { row[k] = 0 }
}

/// out = softmax(inp) per row; out, inp are (N,C). out may alias inp.
public func softmaxForward(_ out: UnsafeMutablePointer<Float>, _ inp: UnsafePointer<Float>, n: Int, c: Int) {
    profiled(.softmax, .forward) {
        if UnsafePointer(out) != inp { out.update(from: inp, count: n * c) }
        for r in 0..<n { softmaxRow(out + r * c, n: c, valid: c) }
    }
}

/// Multi-head self-attention on packed projections.
/// qkv is (B,T,3D) holding q, k, v of each token (D = H·hd, heads contiguous within each);
/// out is (B,T,D) = softmax(q·kᵀ/√hd [+ causal mask]) · v per head; probs (B,H,T,T) is saved for the backward.
/// With `onlyRow` r, only query row r is computed: out is (B,1,D) and probs (B,H,1,T).
public func attentionForward(_ out: UnsafeMutablePointer<Float>, probs: UnsafeMutablePointer<Float>,
                             _ qkv: UnsafePointer<Float>, b: Int, t: Int, d: Int, heads: Int, causal: Bool,
                             onlyRow: Int? = nil) {
    profiled(.attention, .forward) {
        let hd = d / heads
        let scale = 1 / Float(hd).squareRoot()
        let rows = onlyRow == nil ? t : 1, first = onlyRow ?? 0
        parallelFor(b * heads) { items in
            for item in items {
                let bi = item / heads, h = item % heads
                let k = qkv + bi * t * 3 * d + d + h * hd, v = k + d
                let q = k - d + first * 3 * d
                let p = probs + item * rows * t
                // p (rows,T) = scale · q (rows,hd) · kᵀ
                attentionPart(.scoreGEMM) {
                    sgemm(transB: true, m: rows, n: t, k: hd, alpha: scale, a: q, lda: 3 * d, b: k, ldb: 3 * d,
                          c: p, ldc: t)
                }
                attentionPart(.softmax) {
                    for i in 0..<rows { softmaxRow(p + i * t, n: t, valid: causal ? first + i + 1 : t) }
                }
                // out (rows,hd) = p · v
                attentionPart(.valueGEMM) {
                    sgemm(m: rows, n: hd, k: t, a: p, lda: t, b: v, ldb: 3 * d, c: out + bi * rows * d + h * hd, ldc: d)
                }
            }
        }
    }
}

/// Backward of attentionForward, accumulating into dqkv (B,T,3D) from dout (B,T,D); with `onlyRow` r the
/// forward's single query row: dout (B,1,D), probs (B,H,1,T). With `accumulate` false (full rows only)
/// dqkv is written, not read.
/// Forward: s = scale·q·kᵀ; p = softmax(s); out = p·v.
public func attentionBackward(dqkv: UnsafeMutablePointer<Float>, _ dout: UnsafePointer<Float>,
                              _ qkv: UnsafePointer<Float>, probs: UnsafePointer<Float>,
                              b: Int, t: Int, d: Int, heads: Int, onlyRow: Int? = nil, accumulate: Bool = true) {
    precondition(accumulate || onlyRow == nil, "attentionBackward: a single query row accumulates (the other rows of dq stay)")
    let beta: Float = accumulate ? 1 : 0
    profiled(.attention, .backward) {
        let hd = d / heads
        let scale = 1 / Float(hd).squareRoot()
        let rows = onlyRow == nil ? t : 1, first = onlyRow ?? 0
        parallelFor(b * heads) { items in
            let dp = UnsafeMutablePointer<Float>.allocate(capacity: rows * t)
            defer { dp.deallocate() }
            for item in items {
                let bi = item / heads, h = item % heads
                let off = bi * t * 3 * d + h * hd
                let k = qkv + off + d, v = k + d, q = qkv + off + first * 3 * d
                let dk = dqkv + off + d, dv = dk + d, dq = dqkv + off + first * 3 * d
                let dO = dout + bi * rows * d + h * hd
                let p = probs + item * rows * t
                // dp (rows,T) = dO (rows,hd) · vᵀ ; dv += pᵀ · dO
                attentionPart(.scoreGEMM) {
                    sgemm(transB: true, m: rows, n: t, k: hd, a: dO, lda: d, b: v, ldb: 3 * d, c: dp, ldc: t)
                }
                attentionPart(.valueGEMM) {
                    sgemm(transA: true, m: t, n: hd, k: rows, a: p, lda: t, b: dO, ldb: d, beta: beta, c: dv, ldc: 3 * d)
                }
                // ds = p ⊙ (dp − Σⱼ p·dp), written over dp
                attentionPart(.softmax) {
                    for i in 0..<rows {
                        let pr = p + i * t, dr = dp + i * t
                        var dot: Float = 0
                        for j in 0..<t { dot += pr[j] * dr[j] }
                        for j in 0..<t { dr[j] = pr[j] * (dr[j] - dot) }
                    }
                }
                // dq += scale · ds · k ; dk += scale · dsᵀ · q
                attentionPart(.valueGEMM) {
                    sgemm(m: rows, n: hd, k: t, alpha: scale, a: dp, lda: t, b: k, ldb: 3 * d, beta: beta, c: dq, ldc: 3 * d)
                    sgemm(transA: true, m: t, n: hd, k: rows, alpha: scale, a: dp, lda: t, b: q, ldb: 3 * d, beta: beta,
                          c: dk, ldc: 3 * d)
                }
            }
        }
    }
}
