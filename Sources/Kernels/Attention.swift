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

/// The largest of 8 lanes (SIMD's generic `max()` is a call, not inlined).
@inline(__always)
func laneMax(_ v: SIMD8<Float>) -> Float {
    let a = SIMD4<Float>(v[0], v[1], v[2], v[3]), b = SIMD4<Float>(v[4], v[5], v[6], v[7])
    let m = a.replacing(with: b, where: b .> a)
    return max(max(m[0], m[1]), max(m[2], m[3]))
}

/// `softmaxRow` for a row padded to `ld` (a multiple of 8, ≥ valid): every pass 8 lanes at a time, the
/// lanes at and past `valid` masked (−∞ for the maximum, 0 after the exponential), so there is no scalar
/// loop and no exponential per leftover entry. Entries valid..<ld end 0.
@inline(__always)
func softmaxRowPadded(_ row: UnsafeMutablePointer<Float>, ld: Int, valid: Int) {
    let lane = SIMD8<Int32>(0, 1, 2, 3, 4, 5, 6, 7)
    var m8 = SIMD8<Float>(repeating: -.infinity)
    var j = 0
    while j + 8 <= valid { let x = load8(row + j); m8.replace(with: x, where: x .> m8); j += 8 }
    if j < valid {
        let x = load8(row + j).replacing(with: -.infinity, where: lane .>= Int32(valid - j))
        m8.replace(with: x, where: x .> m8)
    }
    let mx = SIMD8<Float>(repeating: laneMax(m8))
    var s8 = SIMD8<Float>()
    j = 0
    while j + 8 <= valid { let e = exp8(load8(row + j) - mx); store8(row + j, e); s8 += e; j += 8 }
    if j < valid {
        let e = exp8(load8(row + j) - mx).replacing(with: 0, where: lane .>= Int32(valid - j))
        store8(row + j, e); s8 += e; j += 8
    }
    while j < ld { store8(row + j, SIMD8<Float>()); j += 8 }
    let inv = SIMD8<Float>(repeating: 1 / s8.sum())
    j = 0
    while j < valid { store8(row + j, load8(row + j) * inv); j += 8 }
}

/// `softmaxRow` with its passes 8 lanes at a time and the leftover entries (< 8) in one exponential of
/// their own, for rows that may not be read past their end (the per-head kernel's probs, stride T).
@inline(__always)
func softmaxRowVector(_ row: UnsafeMutablePointer<Float>, n: Int, valid: Int) {
    let full = valid / 8 * 8, rest = valid - full
    var m8 = SIMD8<Float>(repeating: -.infinity)
    var j = 0
    while j < full { let x = load8(row + j); m8.replace(with: x, where: x .> m8); j += 8 }
    var mx = laneMax(m8)
    for i in full..<valid { mx = max(mx, row[i]) }
    let mx8 = SIMD8<Float>(repeating: mx)
    var s8 = SIMD8<Float>()
    j = 0
    while j < full { let e = exp8(load8(row + j) - mx8); store8(row + j, e); s8 += e; j += 8 }
    var s = s8.sum()
    if rest > 0 {
        var x = SIMD8<Float>(repeating: -.infinity)
        for i in 0..<rest { x[i] = row[full + i] }
        let e = exp8(x - mx8)
        for i in 0..<rest { row[full + i] = e[i]; s += e[i] }
    }
    let inv = 1 / s, inv8 = SIMD8<Float>(repeating: inv)
    j = 0
    while j < full { store8(row + j, load8(row + j) * inv8); j += 8 }
    for i in full..<valid { row[i] *= inv }
    for i in valid..<n { row[i] = 0 }
}

/// out = softmax(inp) per row; out, inp are (N,C). out may alias inp.
public func softmaxForward(_ out: UnsafeMutablePointer<Float>, _ inp: UnsafePointer<Float>, n: Int, c: Int) {
    profiled(.softmax, .forward) {
        if UnsafePointer(out) != inp { out.update(from: inp, count: n * c) }
        for r in 0..<n { softmaxRow(out + r * c, n: c, valid: c) }
    }
}

// MARK: - Which attention kernel runs

/// The two implementations of `attentionForward` / `attentionBackward` (docs/benchmarks.md, "Attention").
public enum AttentionKernel: Sendable, Equatable {
    /// Per (image, head): the products in 4 × 16 register tiles of our own (`smallGEMM`), the scores of a
    /// block of query rows kept in a cache-sized tile between q·kᵀ, the softmax and p·v. Head sizes that
    /// are a multiple of 16 (64 in every model here). Only when bound (`nolad bench --attention tiled|ab`).
    case tiled
    /// Per (image, head): two (forward) or four (backward) OpenBLAS calls and a SIMD softmax pass between
    /// them. Any head size; the default.
    case perHeadGEMM

    /// The kernel `attentionForward` / `attentionBackward` use for head size `hd`: the bound choice
    /// (`withAttentionKernel`: benchmarks, tests) where it can run, else the per-head one. The per-head
    /// kernel is the default because it measured faster here (docs/benchmarks.md, "Attention"): its
    /// products run in OpenBLAS's AVX-512 kernels, the tiled ones in our AVX2 (x86-64-v3) code at half
    /// the width.
    static func resolved(hd: Int) -> AttentionKernel {
        bound == .tiled && hd % 16 == 0 ? .tiled : .perHeadGEMM
    }

    /// Bound on the calling thread by `withAttentionKernel` (nil: the default choice); carried to the
    /// threads of `parallelFor` and `batchParallel` like the thread count.
    @TaskLocal static var bound: AttentionKernel?

    /// Runs `body` on a parallel loop's thread with the caller's choice (nothing to bind when there is none).
    @inline(__always) static func bind(_ choice: AttentionKernel?, _ body: () -> Void) {
        if let choice { $bound.withValue(choice, operation: body) } else { body() }
    }
}

/// Runs `body` with `kernel` for every attention it calls on this thread (and the threads its loops use):
/// `nolad bench --attention` compares the two in one process; the tests run both against the reference.
public func withAttentionKernel<R>(_ kernel: AttentionKernel?, _ body: () throws -> R) rethrows -> R {
    try AttentionKernel.$bound.withValue(kernel, operation: body)
}

// MARK: - The tiled kernel's products

/// acc + x · y, fused where the CPU has FMA (x86-64-v3, arm64); elsewhere a multiply and an add
/// (`addingProduct` would be a libm call per lane there).
@inline(__always)
func fma8(_ acc: SIMD8<Float>, _ x: SIMD8<Float>, _ y: SIMD8<Float>) -> SIMD8<Float> {
    #if NOLAD_FMA || arch(arm64)
    return acc.addingProduct(x, y)
    #else
    return acc + x * y
    #endif
}

/// C (4 × 16) = alpha · A · B (+ C when `accumulate`), A (4 × k) element (r, e) at a[r·ars + e·acs]
/// (either layout, so a transposed operand needs no copy), B (k × 16) rows at ldb, C rows at ldc.
/// 8 accumulators, 2 loads of B and 4 broadcasts of A per step: every value stays in a register
/// (a 6 × 16 tile spilled three accumulators to the stack in every step).
@inline(__always)
func tile4x16(k: Int, a: UnsafePointer<Float>, ars: Int, acs: Int, b: UnsafePointer<Float>, ldb: Int,
              c: UnsafeMutablePointer<Float>, ldc: Int, alpha: Float, accumulate: Bool) {
    var c00 = SIMD8<Float>(), c01 = SIMD8<Float>(), c10 = SIMD8<Float>(), c11 = SIMD8<Float>()
    var c20 = SIMD8<Float>(), c21 = SIMD8<Float>(), c30 = SIMD8<Float>(), c31 = SIMD8<Float>()
    var a0 = a, a1 = a + ars, a2 = a + 2 &* ars, a3 = a + 3 &* ars
    var bp = b
    var e = 0
    while e < k {
        let b0 = load8(bp), b1 = load8(bp + 8)
        var x = SIMD8<Float>(repeating: a0.pointee); c00 = fma8(c00, x, b0); c01 = fma8(c01, x, b1)
        x = SIMD8<Float>(repeating: a1.pointee); c10 = fma8(c10, x, b0); c11 = fma8(c11, x, b1)
        x = SIMD8<Float>(repeating: a2.pointee); c20 = fma8(c20, x, b0); c21 = fma8(c21, x, b1)
        x = SIMD8<Float>(repeating: a3.pointee); c30 = fma8(c30, x, b0); c31 = fma8(c31, x, b1)
        a0 += acs; a1 += acs; a2 += acs; a3 += acs; bp += ldb
        e &+= 1
    }
    let al = SIMD8<Float>(repeating: alpha)
    var p = c
    if accumulate {
        store8(p, fma8(load8(p), al, c00)); store8(p + 8, fma8(load8(p + 8), al, c01)); p += ldc
        store8(p, fma8(load8(p), al, c10)); store8(p + 8, fma8(load8(p + 8), al, c11)); p += ldc
        store8(p, fma8(load8(p), al, c20)); store8(p + 8, fma8(load8(p + 8), al, c21)); p += ldc
        store8(p, fma8(load8(p), al, c30)); store8(p + 8, fma8(load8(p + 8), al, c31))
    } else {
        store8(p, al * c00); store8(p + 8, al * c01); p += ldc
        store8(p, al * c10); store8(p + 8, al * c11); p += ldc
        store8(p, al * c20); store8(p + 8, al * c21); p += ldc
        store8(p, al * c30); store8(p + 8, al * c31)
    }
}

/// One row of `tile4x16`: C (1 × 16) = alpha · a (1 × k) · B (+ C); k unrolled by two for four chains.
@inline(__always)
func tile1x16(k: Int, a: UnsafePointer<Float>, acs: Int, b: UnsafePointer<Float>, ldb: Int,
              c: UnsafeMutablePointer<Float>, alpha: Float, accumulate: Bool) {
    var s0 = SIMD8<Float>(), s1 = SIMD8<Float>(), t0 = SIMD8<Float>(), t1 = SIMD8<Float>()
    var e = 0, ap = a, bp = b
    while e &+ 2 <= k {
        let x = SIMD8<Float>(repeating: ap.pointee), y = SIMD8<Float>(repeating: (ap + acs).pointee)
        s0 = fma8(s0, x, load8(bp)); s1 = fma8(s1, x, load8(bp + 8))
        t0 = fma8(t0, y, load8(bp + ldb)); t1 = fma8(t1, y, load8(bp + ldb + 8))
        e &+= 2; ap += 2 &* acs; bp += 2 &* ldb
    }
    if e < k {
        let x = SIMD8<Float>(repeating: ap.pointee)
        s0 = fma8(s0, x, load8(bp)); s1 = fma8(s1, x, load8(bp + 8))
    }
    let al = SIMD8<Float>(repeating: alpha), v0 = s0 + t0, v1 = s1 + t1
    if accumulate { store8(c, fma8(load8(c), al, v0)); store8(c + 8, fma8(load8(c + 8), al, v1)) }
    else { store8(c, al * v0); store8(c + 8, al * v1) }
}

/// C (m × n) = alpha · A · B (+ C when `accumulate`) on this thread, n a multiple of 16: A (m × k) element
/// (r, e) at a[r·ars + e·acs], B (k × n) rows at ldb, C rows at ldc. Columns in chunks of 64, so that
/// a chunk of B (k × 64) stays in the L1/L2 cache while every block of 4 rows of A passes over it.
/// The FLOPs are counted by the caller (`countAttentionFlops`).
func smallGEMM(m: Int, n: Int, k: Int, alpha: Float = 1, a: UnsafePointer<Float>, ars: Int, acs: Int,
               b: UnsafePointer<Float>, ldb: Int, accumulate: Bool, c: UnsafeMutablePointer<Float>, ldc: Int) {
    precondition(n % 16 == 0, "smallGEMM: n is a multiple of 16")
    var jc = 0
    while jc < n {
        let je = min(n, jc + 64)
        var i = 0
        while i + 4 <= m {
            var j = jc
            while j < je {
                tile4x16(k: k, a: a + i * ars, ars: ars, acs: acs, b: b + j, ldb: ldb, c: c + i * ldc + j, ldc: ldc,
                         alpha: alpha, accumulate: accumulate)
                j += 16
            }
            i += 4
        }
        while i < m {
            var j = jc
            while j < je {
                tile1x16(k: k, a: a + i * ars, acs: acs, b: b + j, ldb: ldb, c: c + i * ldc + j, alpha: alpha, accumulate: accumulate)
                j += 16
            }
            i += 1
        }
        jc = je
    }
}

/// Adds the FLOPs of a (m, n, k) product run inside the attention op to the profile (as `sgemm` does for
/// its calls), so the bench's FLOP count is the same whichever kernel runs.
@inline(__always)
func countAttentionFlops(m: Int, n: Int, k: Int) {
    guard Profiling.on, let context = Profiling.context, let inside = context.inside else { return }
    context.profile.addFlops(inside.op, inside.phase, GEMMShape(m: m, n: n, k: k, transA: false, transB: false))
}

/// dst (hd × ld) = srcᵀ for src (t × hd) rows at stride `stride`; columns t..<ld set to 0.
@inline(__always)
func packTransposed(_ dst: UnsafeMutablePointer<Float>, _ src: UnsafePointer<Float>, t: Int, hd: Int, stride: Int, ld: Int) {
    for j in 0..<t {
        let row = src + j * stride
        for e in 0..<hd { dst[e * ld + j] = row[e] }
    }
    if ld > t { for e in 0..<hd { (dst + e * ld + t).update(repeating: 0, count: ld - t) } }
}

/// Query rows per block of the tiled forward: the block's scores (48 × T, 40 KB at T = 208) stay in the
/// L1/L2 cache from q·kᵀ through the softmax to p·v.
let attentionRowBlock = 48

// MARK: - Attention

/// Multi-head self-attention on packed projections.
/// qkv is (B,T,3D) holding q, k, v of each token (D = H·hd, heads contiguous within each);
/// out is (B,T,D) = softmax(q·kᵀ/√hd [+ causal mask]) · v per head; probs (B,H,T,T), when given, is saved
/// for the backward (inference passes nil).
/// With `onlyRow` r, only query row r is computed: out is (B,1,D) and probs (B,H,1,T).
/// Threaded over (image × head) with the caller's threads; each (image, head) is computed the same way
/// whatever the thread count, so the bits do not depend on it.
public func attentionForward(_ out: UnsafeMutablePointer<Float>, probs: UnsafeMutablePointer<Float>?,
                             _ qkv: UnsafePointer<Float>, b: Int, t: Int, d: Int, heads: Int, causal: Bool,
                             onlyRow: Int? = nil) {
    let hd = d / heads
    switch AttentionKernel.resolved(hd: hd) {
    case .tiled:
        tiledAttentionForward(out, probs: probs, qkv, b: b, t: t, d: d, heads: heads, causal: causal, onlyRow: onlyRow)
    case .perHeadGEMM:
        if let probs {
            perHeadAttentionForward(out, probs: probs, qkv, b: b, t: t, d: d, heads: heads, causal: causal, onlyRow: onlyRow)
        } else {
            let rows = onlyRow == nil ? t : 1
            let scratch = UnsafeMutablePointer<Float>.allocate(capacity: b * heads * rows * t)
            defer { scratch.deallocate() }
            perHeadAttentionForward(out, probs: scratch, qkv, b: b, t: t, d: d, heads: heads, causal: causal, onlyRow: onlyRow)
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
    switch AttentionKernel.resolved(hd: d / heads) {
    case .tiled:
        tiledAttentionBackward(dqkv: dqkv, dout, qkv, probs: probs, b: b, t: t, d: d, heads: heads, onlyRow: onlyRow,
                               accumulate: accumulate)
    case .perHeadGEMM:
        perHeadAttentionBackward(dqkv: dqkv, dout, qkv, probs: probs, b: b, t: t, d: d, heads: heads, onlyRow: onlyRow,
                                 accumulate: accumulate)
    }
}

/// The tiled forward (`AttentionKernel.tiled`). Per (image, head): kᵀ packed once (hd × T rounded up to 16,
/// zero-padded), then for each block of up to 48 query rows: s = scale·q·kᵀ into the block's tile,
/// softmax in place (copied out to probs when saved), out = p·v from the tile.
func tiledAttentionForward(_ out: UnsafeMutablePointer<Float>, probs: UnsafeMutablePointer<Float>?,
                           _ qkv: UnsafePointer<Float>, b: Int, t: Int, d: Int, heads: Int, causal: Bool, onlyRow: Int?) {
    profiled(.attention, .forward) {
        let hd = d / heads, ld = (t + 15) / 16 * 16
        let scale = 1 / Float(hd).squareRoot()
        let rows = onlyRow == nil ? t : 1, first = onlyRow ?? 0
        parallelFor(b * heads) { items in
            let kt = UnsafeMutablePointer<Float>.allocate(capacity: hd * ld)
            let tile = UnsafeMutablePointer<Float>.allocate(capacity: min(rows, attentionRowBlock) * ld)
            defer { kt.deallocate(); tile.deallocate() }
            for item in items {
                let bi = item / heads, h = item % heads
                let base = qkv + bi * t * 3 * d + h * hd
                let k = base + d, v = base + 2 * d
                attentionPart(.scoreGEMM) { packTransposed(kt, k, t: t, hd: hd, stride: 3 * d, ld: ld) }
                var r0 = 0
                while r0 < rows {
                    let nr = min(attentionRowBlock, rows - r0)
                    let q = base + (first + r0) * 3 * d
                    // tile (nr × ld) = scale · q (nr × hd) · kᵀ (hd × ld)
                    attentionPart(.scoreGEMM) {
                        smallGEMM(m: nr, n: ld, k: hd, alpha: scale, a: q, ars: 3 * d, acs: 1, b: kt, ldb: ld,
                                  accumulate: false, c: tile, ldc: ld)
                    }
                    attentionPart(.softmax) {
                        for i in 0..<nr {
                            let row = tile + i * ld
                            softmaxRowPadded(row, ld: ld, valid: causal ? first + r0 + i + 1 : t)
                            if let probs { (probs + (item * rows + r0 + i) * t).update(from: row, count: t) }
                        }
                    }
                    // out (nr × hd) = p (nr × t) · v (t × hd)
                    attentionPart(.valueGEMM) {
                        smallGEMM(m: nr, n: hd, k: t, a: tile, ars: ld, acs: 1, b: v, ldb: 3 * d, accumulate: false,
                                  c: out + (bi * rows + r0) * d + h * hd, ldc: d)
                    }
                    r0 += nr
                }
            }
        }
        countAttentionFlops(m: b * heads * rows, n: t, k: hd)
        countAttentionFlops(m: b * heads * rows, n: hd, k: t)
    }
}

/// The tiled backward (`AttentionKernel.tiled`). Per (image, head), with p from the forward:
/// dp = dO·vᵀ (vᵀ packed like kᵀ), ds = p ⊙ (dp − Σⱼ p·dp) in the same tile, then
/// dv (+)= pᵀ·dO, dq (+)= scale·ds·k, dk (+)= scale·dsᵀ·q, the transposed operands read in place.
func tiledAttentionBackward(dqkv: UnsafeMutablePointer<Float>, _ dout: UnsafePointer<Float>,
                            _ qkv: UnsafePointer<Float>, probs: UnsafePointer<Float>,
                            b: Int, t: Int, d: Int, heads: Int, onlyRow: Int?, accumulate: Bool) {
    profiled(.attention, .backward) {
        let hd = d / heads, ld = (t + 15) / 16 * 16
        let scale = 1 / Float(hd).squareRoot()
        let rows = onlyRow == nil ? t : 1, first = onlyRow ?? 0
        parallelFor(b * heads) { items in
            let vt = UnsafeMutablePointer<Float>.allocate(capacity: hd * ld)
            let ds = UnsafeMutablePointer<Float>.allocate(capacity: rows * ld)
            defer { vt.deallocate(); ds.deallocate() }
            for item in items {
                let bi = item / heads, h = item % heads
                let off = bi * t * 3 * d + h * hd
                let k = qkv + off + d, v = k + d, q = qkv + off + first * 3 * d
                let dk = dqkv + off + d, dv = dk + d, dq = dqkv + off + first * 3 * d
                let dO = dout + bi * rows * d + h * hd
                let p = probs + item * rows * t
                // ds (rows × ld) = dO (rows × hd) · vᵀ
                attentionPart(.scoreGEMM) {
                    packTransposed(vt, v, t: t, hd: hd, stride: 3 * d, ld: ld)
                    smallGEMM(m: rows, n: ld, k: hd, a: dO, ars: d, acs: 1, b: vt, ldb: ld, accumulate: false, c: ds, ldc: ld)
                }
                // ds = p ⊙ (dp − Σⱼ p·dp), the padding columns 0
                attentionPart(.softmax) {
                    for i in 0..<rows {
                        let pr = p + i * t, dr = ds + i * ld
                        var dot8 = SIMD8<Float>(), j = 0
                        while j + 8 <= t { dot8 = fma8(dot8, load8(pr + j), load8(dr + j)); j += 8 }
                        var dot = dot8.sum()
                        while j < t { dot += pr[j] * dr[j]; j += 1 }
                        let dot8b = SIMD8<Float>(repeating: dot)
                        j = 0
                        while j + 8 <= t { store8(dr + j, load8(pr + j) * (load8(dr + j) - dot8b)); j += 8 }
                        while j < t { dr[j] = pr[j] * (dr[j] - dot); j += 1 }
                        for j in t..<ld { dr[j] = 0 }
                    }
                }
                attentionPart(.valueGEMM) {
                    // dv (t × hd) (+)= pᵀ (t × rows) · dO (rows × hd)
                    smallGEMM(m: t, n: hd, k: rows, a: p, ars: 1, acs: t, b: dO, ldb: d, accumulate: accumulate, c: dv, ldc: 3 * d)
                    // dq (rows × hd) (+)= scale · ds (rows × t) · k (t × hd)
                    smallGEMM(m: rows, n: hd, k: t, alpha: scale, a: ds, ars: ld, acs: 1, b: k, ldb: 3 * d, accumulate: accumulate,
                              c: dq, ldc: 3 * d)
                    // dk (t × hd) (+)= scale · dsᵀ (t × rows) · q (rows × hd)
                    smallGEMM(m: t, n: hd, k: rows, alpha: scale, a: ds, ars: 1, acs: ld, b: q, ldb: 3 * d, accumulate: accumulate,
                              c: dk, ldc: 3 * d)
                }
            }
        }
        countAttentionFlops(m: b * heads * rows, n: t, k: hd)
        countAttentionFlops(m: b * heads * t, n: hd, k: rows)
        countAttentionFlops(m: b * heads * rows, n: hd, k: t)
        countAttentionFlops(m: b * heads * t, n: hd, k: rows)
    }
}

// MARK: - The per-head sgemm kernel

/// The per-head forward (`AttentionKernel.perHeadGEMM`), as attentionForward; probs (B,H,T,T) is its tile.
func perHeadAttentionForward(_ out: UnsafeMutablePointer<Float>, probs: UnsafeMutablePointer<Float>,
                             _ qkv: UnsafePointer<Float>, b: Int, t: Int, d: Int, heads: Int, causal: Bool,
                             onlyRow: Int?) {
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
                    for i in 0..<rows { softmaxRowVector(p + i * t, n: t, valid: causal ? first + i + 1 : t) }
                }
                // out (rows,hd) = p · v
                attentionPart(.valueGEMM) {
                    sgemm(m: rows, n: hd, k: t, a: p, lda: t, b: v, ldb: 3 * d, c: out + bi * rows * d + h * hd, ldc: d)
                }
            }
        }
    }
}

/// The per-head backward (`AttentionKernel.perHeadGEMM`), as attentionBackward.
func perHeadAttentionBackward(dqkv: UnsafeMutablePointer<Float>, _ dout: UnsafePointer<Float>,
                              _ qkv: UnsafePointer<Float>, probs: UnsafePointer<Float>,
                              b: Int, t: Int, d: Int, heads: Int, onlyRow: Int?, accumulate: Bool) {
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
