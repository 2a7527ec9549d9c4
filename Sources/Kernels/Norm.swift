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
/// dweight and dbias are split by columns, each column summed over the rows in order, so their bits do not
/// depend on the thread count; dinp is split by rows.
public func layerNormBackward(dinp: UnsafeMutablePointer<Float>?, dweight: UnsafeMutablePointer<Float>?,
                              dbias: UnsafeMutablePointer<Float>?,
                              _ dout: UnsafePointer<Float>, _ inp: UnsafePointer<Float>, _ weight: UnsafePointer<Float>,
                              mean: UnsafePointer<Float>, rstd: UnsafePointer<Float>, n: Int, c: Int) {
    profiled(.layerNorm, .backward) {
        if dweight != nil || dbias != nil {
            // 32 columns per walk down the rows (4 + 4 accumulators); the last group's columns one by one.
            // Each column's sum takes the rows in order from its value on entry, whatever the split.
            let groups = (c + 31) / 32
            parallelFor(groups, grain: max(1, 8192 / max(n, 1))) { part in
                for g in part {
                    let lo = g * 32
                    guard lo + 32 <= c else {
                        for r in 0..<n {
                            let x = inp + r * c, dy = dout + r * c
                            for i in lo..<c {
                                dweight?[i] += dy[i] * (x[i] - mean[r]) * rstd[r]
                                dbias?[i] += dy[i]
                            }
                        }
                        continue
                    }
                    let w = dweight.map { $0 + lo }, bb = dbias.map { $0 + lo }
                    var w0 = w.map { load8($0) } ?? .zero, w1 = w.map { load8($0 + 8) } ?? .zero
                    var w2 = w.map { load8($0 + 16) } ?? .zero, w3 = w.map { load8($0 + 24) } ?? .zero
                    var b0 = bb.map { load8($0) } ?? .zero, b1 = bb.map { load8($0 + 8) } ?? .zero
                    var b2 = bb.map { load8($0 + 16) } ?? .zero, b3 = bb.map { load8($0 + 24) } ?? .zero
                    for r in 0..<n {
                        let x = inp + r * c + lo, dy = dout + r * c + lo
                        let m8 = SIMD8<Float>(repeating: mean[r]), rs8 = SIMD8<Float>(repeating: rstd[r])
                        let g0 = load8(dy), g1 = load8(dy + 8), g2 = load8(dy + 16), g3 = load8(dy + 24)
                        w0 += g0 * (load8(x) - m8) * rs8
                        w1 += g1 * (load8(x + 8) - m8) * rs8
                        w2 += g2 * (load8(x + 16) - m8) * rs8
                        w3 += g3 * (load8(x + 24) - m8) * rs8
                        b0 += g0; b1 += g1; b2 += g2; b3 += g3
                    }
                    if let w { store8(w, w0); store8(w + 8, w1); store8(w + 16, w2); store8(w + 24, w3) }
                    if let bb { store8(bb, b0); store8(bb + 8, b1); store8(bb + 16, b2); store8(bb + 24, b3) }
                }
            }
        }
        guard let dinp else { return }
        let c8 = c & ~7
        parallelFor(n, grain: 16) { rows in
            for r in rows {
                let x = inp + r * c, dy = dout + r * c, dx = dinp + r * c
                let m = mean[r], rs = rstd[r]
                let m8 = SIMD8<Float>(repeating: m), rs8 = SIMD8<Float>(repeating: rs)
                // dx̂ = dy · weight;  dx = rstd · (dx̂ − mean(dx̂) − x̂ · mean(dx̂ · x̂))
                var sg8 = SIMD8<Float>(repeating: 0), sgx8 = SIMD8<Float>(repeating: 0)
                var i = 0
                while i < c8 {
                    let g = load8(dy + i) * load8(weight + i)
                    sg8 += g
                    sgx8 += g * ((load8(x + i) - m8) * rs8)
                    i += 8
                }
                var sumG = sg8.sum(), sumGX = sgx8.sum()
                while i < c {
                    let g = dy[i] * weight[i]
                    sumG += g
                    sumGX += g * ((x[i] - m) * rs)
                    i += 1
                }
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
}

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
