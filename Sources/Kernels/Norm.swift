/// out = (inp − mean) · rstd · weight + bias per row; saves mean and rstd (N) for the backward.
/// out, inp are (N,C); weight, bias are (C); mean, rstd are (N) or nil.
public func layerNormForward(_ out: UnsafeMutablePointer<Float>, mean: UnsafeMutablePointer<Float>?,
                             rstd: UnsafeMutablePointer<Float>?, _ inp: UnsafePointer<Float>,
                             _ weight: UnsafePointer<Float>, _ bias: UnsafePointer<Float>,
                             n: Int, c: Int, eps: Float) {
    profiled(.layerNorm, .forward) {
        let c8 = c & ~7
        parallelFor(n, grain: 16) { rows in
            for r in rows {
                let x = inp + r * c, y = out + r * c
                var s8 = SIMD8<Float>(repeating: 0)
                var i = 0
                while i < c8 { s8 += load8(x + i); i += 8 }
                var s = s8.sum()
                while i < c { s += x[i]; i += 1 }
                let m = s / Float(c)
                let m8 = SIMD8<Float>(repeating: m)
                var v8 = SIMD8<Float>(repeating: 0)
                i = 0
                while i < c8 { let d = load8(x + i) - m8; v8 += d * d; i += 8 }
                var v = v8.sum()
                while i < c { let d = x[i] - m; v += d * d; i += 1 }
                let rs = 1 / (v / Float(c) + eps).squareRoot()
                let rs8 = SIMD8<Float>(repeating: rs)
                i = 0
                while i < c8 {
                    store8(y + i, (load8(x + i) - m8) * rs8 * load8(weight + i) + load8(bias + i)); i += 8
                }
                while i < c { y[i] = (x[i] - m) * rs * weight[i] + bias[i]; i += 1 }
                mean?[r] = m
                rstd?[r] = rs
            }
        }
    }
}

/// Backward of layerNormForward, accumulating:
/// dinp (N,C) += ∂/∂inp; dweight (C) += Σ dout·x̂; dbias (C) += Σ dout. Each only when given.
/// Forward: out = x̂ · weight + bias, x̂ = (inp − mean) · rstd.
/// One pass over the rows, in blocks of `layerNormBlock` rows split over the threads: each block sums its
/// rows' dweight and dbias terms in order, and the blocks' sums are added in block order, so the bits do
/// not depend on the thread count.
public func layerNormBackward(dinp: UnsafeMutablePointer<Float>?, dweight: UnsafeMutablePointer<Float>?,
                              dbias: UnsafeMutablePointer<Float>?,
                              _ dout: UnsafePointer<Float>, _ inp: UnsafePointer<Float>, _ weight: UnsafePointer<Float>,
                              mean: UnsafePointer<Float>, rstd: UnsafePointer<Float>, n: Int, c: Int) {
    profiled(.layerNorm, .backward) {
        let wantsWeights = dweight != nil || dbias != nil
        let blocks = (n + layerNormBlock - 1) / layerNormBlock
        // per block: Σ dout·x̂ (C), then Σ dout (C)
        let partial = UnsafeMutablePointer<Float>.allocate(capacity: wantsWeights ? blocks * 2 * c : 1)
        defer { partial.deallocate() }
        if wantsWeights { partial.initialize(repeating: 0, count: blocks * 2 * c) }
        let c8 = c & ~7
        parallelFor(blocks, grain: max(1, 64 / layerNormBlock)) { part in
            for block in part {
                let pw = partial + block * 2 * c, pb = pw + c
                for r in (block * layerNormBlock)..<min(n, (block + 1) * layerNormBlock) {
                    let x = inp + r * c, dy = dout + r * c
                    let m = mean[r], rs = rstd[r]
                    let m8 = SIMD8<Float>(repeating: m), rs8 = SIMD8<Float>(repeating: rs)
                    // dx̂ = dy · weight;  dx = rstd · (dx̂ − mean(dx̂) − x̂ · mean(dx̂ · x̂))
                    var sg8 = SIMD8<Float>(repeating: 0), sgx8 = SIMD8<Float>(repeating: 0)
                    var i = 0
                    while i < c8 {
                        let g = load8(dy + i), xh = (load8(x + i) - m8) * rs8
                        if wantsWeights { store8(pw + i, load8(pw + i) + g * xh); store8(pb + i, load8(pb + i) + g) }
                        let gw = g * load8(weight + i)
                        sg8 += gw
                        sgx8 += gw * xh
                        i += 8
                    }
                    var sumG = sg8.sum(), sumGX = sgx8.sum()
                    while i < c {
                        let g = dy[i], xh = (x[i] - m) * rs
                        if wantsWeights { pw[i] += g * xh; pb[i] += g }
                        sumG += g * weight[i]
                        sumGX += g * weight[i] * xh
                        i += 1
                    }
                    guard let dinp else { continue }
                    let dx = dinp + r * c
                    let mg = sumG / Float(c), mgx = sumGX / Float(c)
                    let mg8 = SIMD8<Float>(repeating: mg), mgx8 = SIMD8<Float>(repeating: mgx)
                    i = 0
                    while i < c8 {
                        let xh = (load8(x + i) - m8) * rs8
                        store8(dx + i, load8(dx + i) + rs8 * (load8(dy + i) * load8(weight + i) - mg8 - xh * mgx8))
                        i += 8
                    }
                    while i < c {
                        let xh = (x[i] - m) * rs
                        dx[i] += rs * (dy[i] * weight[i] - mg - xh * mgx)
                        i += 1
                    }
                }
            }
        }
        guard wantsWeights else { return }
        for block in 0..<blocks {
            let pw = partial + block * 2 * c, pb = pw + c
            if let dweight { for i in 0..<c { dweight[i] += pw[i] } }
            if let dbias { for i in 0..<c { dbias[i] += pb[i] } }
        }
    }
}

/// Rows per block of layerNormBackward's weight gradients (fixed: the sums' bits depend on it, not on threads).
let layerNormBlock = 32

/// out = inp / ‖inp‖ per row; norms (N) saved for the backward. out, inp are (N,C).
public func l2NormalizeForward(_ out: UnsafeMutablePointer<Float>, norms: UnsafeMutablePointer<Float>?,
                               _ inp: UnsafePointer<Float>, n: Int, c: Int) {
    profiled(.loss, .forward) {
        for r in 0..<n {
            var s: Float = 0
            for i in 0..<c { s += inp[r * c + i] * inp[r * c + i] }
            let norm = max(s.squareRoot(), 1e-12)
            for i in 0..<c { out[r * c + i] = inp[r * c + i] / norm }
            norms?[r] = norm
        }
    }
}

/// Backward of `out = inp / ‖inp‖`: dinp += (dout − out · (out·dout)) / ‖inp‖.
public func l2NormalizeBackward(dinp: UnsafeMutablePointer<Float>, _ dout: UnsafePointer<Float>,
                                _ out: UnsafePointer<Float>, norms: UnsafePointer<Float>, n: Int, c: Int) {
    profiled(.loss, .backward) {
        for r in 0..<n {
            var d: Float = 0
            for i in 0..<c { d += out[r * c + i] * dout[r * c + i] }
            for i in 0..<c { dinp[r * c + i] += (dout[r * c + i] - out[r * c + i] * d) / norms[r] }
        }
    }
}
