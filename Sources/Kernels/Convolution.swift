// Convolution kernels of the convolutional towers (MobileCLIP's MCi), on images laid out channels-last:
// an activation (B,H,W,C) is B·H·W rows of C channels, so a 1×1 convolution is `linearForward` over the
// rows, a BatchNorm a per-channel affine, and a depthwise convolution runs 8 channels per SIMD lane group.
// Output sizes follow PyTorch: OH = (H + 2·padding − kernel) / stride + 1.

/// Output side of a convolution over `size` pixels (PyTorch's floor rule).
public func convOutputSize(_ size: Int, kernel: Int, stride: Int, padding: Int) -> Int {
    (size + 2 * padding - kernel) / stride + 1
}

/// im2col of a dense convolution: cols (B·OH·OW, C·k·k) from inp (B,H,W,C); each row ordered (c, ky, kx)
/// like a flattened Conv2d weight (OC,C,k,k); taps outside the image are 0.
public func im2colConv(_ cols: UnsafeMutablePointer<Float>, _ inp: UnsafePointer<Float>,
                       b: Int, h: Int, w: Int, c: Int, kernel k: Int, stride s: Int, padding p: Int) {
    profiled(.convolution, .forward) {
        let oh = convOutputSize(h, kernel: k, stride: s, padding: p), ow = convOutputSize(w, kernel: k, stride: s, padding: p)
        parallelFor(b * oh, grain: 1) { rows in
            for row in rows {
                let bi = row / oh, oy = row % oh
                for ox in 0..<ow {
                    let dst = cols + ((bi * oh + oy) * ow + ox) * c * k * k
                    for ky in 0..<k {
                        let iy = oy * s + ky - p
                        for kx in 0..<k {
                            let ix = ox * s + kx - p
                            let inside = iy >= 0 && iy < h && ix >= 0 && ix < w
                            let src = inp + ((bi * h + max(0, min(iy, h - 1))) * w + max(0, min(ix, w - 1))) * c
                            for ch in 0..<c { dst[(ch * k + ky) * k + kx] = inside ? src[ch] : 0 }
                        }
                    }
                }
            }
        }
    }
}

/// Dense convolution: out (B,OH,OW,OC) = conv(inp (B,H,W,C), weight (OC,C,k,k)) + bias (OC), by im2col and
/// one GEMM. A 1×1 convolution with stride 1 and no padding needs no im2col: call `linearForward` on the rows.
public func conv2dForward(_ out: UnsafeMutablePointer<Float>, _ inp: UnsafePointer<Float>,
                          _ weight: UnsafePointer<Float>, _ bias: UnsafePointer<Float>?,
                          b: Int, h: Int, w: Int, c: Int, outChannels oc: Int, kernel k: Int, stride s: Int, padding p: Int) {
    let oh = convOutputSize(h, kernel: k, stride: s, padding: p), ow = convOutputSize(w, kernel: k, stride: s, padding: p)
    let n = b * oh * ow
    let cols = UnsafeMutablePointer<Float>.allocate(capacity: max(1, n * c * k * k))
    defer { cols.deallocate() }
    im2colConv(cols, inp, b: b, h: h, w: w, c: c, kernel: k, stride: s, padding: p)
    linearForward(out, cols, weight, bias, n: n, inFeatures: c * k * k, outFeatures: oc)
}

/// Depthwise convolution (groups = channels, one filter per channel):
/// out[b,oy,ox,ch] = bias[ch] + Σ_{ky,kx} weight[ky,kx,ch] · inp[b, oy·s+ky−p, ox·s+kx−p, ch].
/// out is (B,OH,OW,C), inp (B,H,W,C), weight (k,k,C) taps-major (a Conv2d weight (C,1,k,k) transposed),
/// bias (C) or nil. With `activation`, out = act(conv + bias) in the same pass (the MCi's conv → GELU units
/// without squeeze-and-excitation), bit for bit what `activationForward` after the convolution gives.
/// A depthwise convolution with a channel multiplier m (C·m outputs, output o reading input o / m) is
/// `repeatChannelsForward` then this.
public func depthwiseConv2dForward(_ out: UnsafeMutablePointer<Float>, _ inp: UnsafePointer<Float>,
                                   _ weight: UnsafePointer<Float>, _ bias: UnsafePointer<Float>?,
                                   b: Int, h: Int, w: Int, c: Int, kernel k: Int, stride s: Int, padding p: Int,
                                   activation act: Activation? = nil) {
    let oh = convOutputSize(h, kernel: k, stride: s, padding: p), ow = convOutputSize(w, kernel: k, stride: s, padding: p)
    // Output columns whose k taps all lie inside the row: ox·s − p ≥ 0 and ox·s − p + k ≤ w.
    let inLo = min(ow, (p + s - 1) / s), inHi = max(inLo, min(ow, w + p - k >= 0 ? (w + p - k) / s + 1 : 0))
    profiled(.convolution, .forward) { parallelFor(b * oh, grain: 1) { rows in
        for row in rows {
            let bi = row / oh, oy = row % oh
            let ky0 = max(0, p - oy * s), ky1 = max(ky0, min(k, h + p - oy * s))
            // the input row of tap ky at output column 0, channel 0 (may point before the row; only taps inside are read)
            let base = inp + ((bi * h + oy * s - p) * w - p) * c
            let o = out + (bi * oh + oy) * ow * c
            var ox = 0
            while ox < ow {
                if ox >= inLo && ox + 4 <= inHi {
                    depthwiseFour(o + ox * c, base + ox * s * c, weight, bias, c: c, w: w, k: k, s: s, ky0: ky0, ky1: ky1, act: act)
                    ox += 4
                } else {
                    let kx0 = max(0, p - ox * s), kx1 = max(kx0, min(k, w + p - ox * s))
                    depthwiseOne(o + ox * c, base + ox * s * c, weight, bias, c: c, w: w, k: k, ky0: ky0, ky1: ky1, kx0: kx0, kx1: kx1, act: act)
                    ox += 1
                }
            }
        }
    } }
}

/// One output pixel (C channels) of a depthwise convolution over taps ky0..<ky1 × kx0..<kx1; src is the input
/// at the pixel's tap (0, 0), channel 0.
@inline(__always)
private func depthwiseOne(_ o: UnsafeMutablePointer<Float>, _ src: UnsafePointer<Float>, _ weight: UnsafePointer<Float>,
                          _ bias: UnsafePointer<Float>?, c: Int, w: Int, k: Int, ky0: Int, ky1: Int, kx0: Int, kx1: Int,
                          act: Activation?) {
    var ch = 0
    while ch + 8 <= c {
        var acc = SIMD8<Float>(repeating: 0)
        if let bias { acc = load8(bias + ch) }
        for ky in ky0..<ky1 {
            let x = src + ky * w * c + ch, wt = weight + ky * k * c + ch
            for kx in kx0..<kx1 { acc.addProduct(load8(x + kx * c), load8(wt + kx * c)) }
        }
        store8(o + ch, activated8(acc, act))
        ch += 8
    }
    while ch < c {
        var acc = bias?[ch] ?? 0
        for ky in ky0..<ky1 { for kx in kx0..<kx1 { acc += src[(ky * w + kx) * c + ch] * weight[(ky * k + kx) * c + ch] } }
        o[ch] = activated1(acc, act)
        ch += 1
    }
}

/// Four neighbouring output pixels whose taps lie inside the row: each weight vector is loaded once for
/// the four (the loads, not the multiply-adds, bound the one-pixel loop).
@inline(__always)
private func depthwiseFour(_ o: UnsafeMutablePointer<Float>, _ src: UnsafePointer<Float>, _ weight: UnsafePointer<Float>,
                           _ bias: UnsafePointer<Float>?, c: Int, w: Int, k: Int, s: Int, ky0: Int, ky1: Int, act: Activation?) {
    let step = s * c
    var ch = 0
    while ch + 8 <= c {
        var b0 = SIMD8<Float>(repeating: 0)
        if let bias { b0 = load8(bias + ch) }
        var a0 = b0, a1 = b0, a2 = b0, a3 = b0
        for ky in ky0..<ky1 {
            let x = src + ky * w * c + ch, wt = weight + ky * k * c + ch
            for kx in 0..<k {
                let wv = load8(wt + kx * c), xk = x + kx * c
                a0.addProduct(load8(xk), wv)
                a1.addProduct(load8(xk + step), wv)
                a2.addProduct(load8(xk + 2 * step), wv)
                a3.addProduct(load8(xk + 3 * step), wv)
            }
        }
        store8(o + ch, activated8(a0, act)); store8(o + c + ch, activated8(a1, act))
        store8(o + 2 * c + ch, activated8(a2, act)); store8(o + 3 * c + ch, activated8(a3, act))
        ch += 8
    }
    while ch < c {
        for j in 0..<4 {
            var acc = bias?[ch] ?? 0
            for ky in ky0..<ky1 { for kx in 0..<k { acc += src[(ky * w + kx) * c + j * step + ch] * weight[(ky * k + kx) * c + ch] } }
            o[j * c + ch] = activated1(acc, act)
        }
        ch += 1
    }
}

/// act(v) for 8 lanes (v itself without an activation), as `activationForward` computes it.
@inline(__always)
func activated8(_ v: SIMD8<Float>, _ act: Activation?) -> SIMD8<Float> {
    switch act {
    case nil: v
    case .gelu: gelu8(v)
    case .quickGelu: quickGelu8(v)
    }
}

/// act(v) for one value, through lane 0 of the 8-lane form (as `activationForward`'s tail).
@inline(__always)
func activated1(_ v: Float, _ act: Activation?) -> Float {
    guard act != nil else { return v }
    var x = SIMD8<Float>(repeating: 0); x[0] = v
    return activated8(x, act)[0]
}

/// Backward of depthwiseConv2dForward for its input, accumulating dinp (B,H,W,C) += ∂/∂inp from
/// dout (B,OH,OW,C) (the weight is frozen). Forward: out[oy,ox] += weight[ky,kx] · inp[oy·s+ky−p, ox·s+kx−p];
/// each input pixel gathers the output pixels it fed, so rows run in parallel without conflicts.
public func depthwiseConv2dBackward(dinp: UnsafeMutablePointer<Float>, _ dout: UnsafePointer<Float>,
                                    _ weight: UnsafePointer<Float>,
                                    b: Int, h: Int, w: Int, c: Int, kernel k: Int, stride s: Int, padding p: Int) {
    let oh = convOutputSize(h, kernel: k, stride: s, padding: p), ow = convOutputSize(w, kernel: k, stride: s, padding: p)
    let c8 = c & ~7
    profiled(.convolution, .backward) {
        parallelFor(b * h, grain: 1) { rows in
            for row in rows {
                let bi = row / h, iy = row % h
                for ix in 0..<w {
                    let d = dinp + ((bi * h + iy) * w + ix) * c
                    for ky in 0..<k {
                        let ty = iy + p - ky
                        guard ty >= 0, ty % s == 0, ty / s < oh else { continue }
                        let oy = ty / s
                        for kx in 0..<k {
                            let tx = ix + p - kx
                            guard tx >= 0, tx % s == 0, tx / s < ow else { continue }
                            let g = dout + ((bi * oh + oy) * ow + tx / s) * c, wt = weight + (ky * k + kx) * c
                            var ch = 0
                            while ch < c8 { store8(d + ch, load8(d + ch) + load8(g + ch) * load8(wt + ch)); ch += 8 }
                            while ch < c { d[ch] += g[ch] * wt[ch]; ch += 1 }
                        }
                    }
                }
            }
        }
    }
}

/// out (N, C·m) with out[r, o] = inp[r, o / m]: the input side of a grouped convolution with one input
/// channel per group and m outputs per group (timm's `group_size=1` with out = m · in).
public func repeatChannelsForward(_ out: UnsafeMutablePointer<Float>, _ inp: UnsafePointer<Float>, n: Int, c: Int, multiplier m: Int) {
    profiled(.copy) {
        parallelFor(n, grain: 64) { rows in
            for r in rows {
                let src = inp + r * c, dst = out + r * c * m
                for i in 0..<c { for j in 0..<m { dst[i * m + j] = src[i] } }
            }
        }
    }
}

/// Backward of repeatChannelsForward: dinp[r, i] += Σ_j dout[r, i·m + j].
public func repeatChannelsBackward(dinp: UnsafeMutablePointer<Float>, _ dout: UnsafePointer<Float>, n: Int, c: Int, multiplier m: Int) {
    profiled(.copy, .backward) {
        parallelFor(n, grain: 64) { rows in
            for r in rows {
                let src = dout + r * c * m, dst = dinp + r * c
                for i in 0..<c { for j in 0..<m { dst[i] += src[i * m + j] } }
            }
        }
    }
}

/// out = inp · scale + shift per channel (an inference BatchNorm: scale = γ/√(var+ε), shift = β − mean·scale).
/// out, inp are (N,C); scale, shift (C). out may alias inp.
public func channelAffineForward(_ out: UnsafeMutablePointer<Float>, _ inp: UnsafePointer<Float>,
                                 _ scale: UnsafePointer<Float>, _ shift: UnsafePointer<Float>, n: Int, c: Int) {
    profiled(.layerNorm, .forward) {
        let c8 = c & ~7
        parallelFor(n, grain: 64) { rows in
            for r in rows {
                let x = inp + r * c, y = out + r * c
                var i = 0
                while i < c8 { store8(y + i, load8(x + i) * load8(scale + i) + load8(shift + i)); i += 8 }
                while i < c { y[i] = x[i] * scale[i] + shift[i]; i += 1 }
            }
        }
    }
}

/// Backward of channelAffineForward, accumulating: dinp (N,C) += dout · scale; dscale (C) += Σ_rows dout · inp;
/// dshift (C) += Σ_rows dout. Each only when given.
public func channelAffineBackward(dinp: UnsafeMutablePointer<Float>?, dscale: UnsafeMutablePointer<Float>?,
                                  dshift: UnsafeMutablePointer<Float>?, _ dout: UnsafePointer<Float>,
                                  _ inp: UnsafePointer<Float>, _ scale: UnsafePointer<Float>, n: Int, c: Int) {
    profiled(.layerNorm, .backward) {
        // the per-channel sums run over the rows in order, 8 channels at a time (the same bits whatever the threads)
        if dscale != nil || dshift != nil {
            parallelFor((c + 7) / 8, grain: 4) { groups in
                for g in groups {
                    let i0 = g * 8, lanes = min(8, c - i0)
                    var s = SIMD8<Float>(repeating: 0), t = SIMD8<Float>(repeating: 0)
                    if lanes == 8 {
                        for r in 0..<n {
                            let dy = load8(dout + r * c + i0)
                            s.addProduct(dy, load8(inp + r * c + i0)); t += dy
                        }
                    } else {
                        for r in 0..<n { for l in 0..<lanes {
                            let dy = dout[r * c + i0 + l]
                            s[l] = s[l].addingProduct(dy, inp[r * c + i0 + l]); t[l] += dy
                        } }
                    }
                    for l in 0..<lanes { dscale?[i0 + l] += s[l]; dshift?[i0 + l] += t[l] }
                }
            }
        }
        guard let dinp else { return }
        parallelFor(n, grain: 64) { rows in
            for r in rows {
                let d = dinp + r * c, dy = dout + r * c
                var i = 0
                while i + 8 <= c { store8(d + i, load8(d + i) + load8(dy + i) * load8(scale + i)); i += 8 }
                while i < c { d[i] += dy[i] * scale[i]; i += 1 }
            }
        }
    }
}

/// out (B,C) = mean over the N rows of each image of inp (B,N,C): global average pooling.
public func meanRowsForward(_ out: UnsafeMutablePointer<Float>, _ inp: UnsafePointer<Float>, b: Int, n: Int, c: Int) {
    profiled(.residual, .forward) {
        for bi in 0..<b {
            let o = out + bi * c
            o.update(repeating: 0, count: c)
            for r in 0..<n { let x = inp + (bi * n + r) * c; for i in 0..<c { o[i] += x[i] } }
            let inv = 1 / Float(n)
            for i in 0..<c { o[i] *= inv }
        }
    }
}

/// Backward of meanRowsForward: dinp[b,r,c] += dout[b,c] / N.
public func meanRowsBackward(dinp: UnsafeMutablePointer<Float>, _ dout: UnsafePointer<Float>, b: Int, n: Int, c: Int) {
    profiled(.residual, .backward) {
        let inv = 1 / Float(n)
        for bi in 0..<b { for r in 0..<n { let d = dinp + (bi * n + r) * c; for i in 0..<c { d[i] += dout[bi * c + i] * inv } } }
    }
}

/// out (B,N,C) = inp (B,N,C) · gate[b,c] (gate (B,C)): the excitation of a squeeze-and-excitation block.
/// out may alias inp.
public func channelGateForward(_ out: UnsafeMutablePointer<Float>, _ inp: UnsafePointer<Float>,
                               _ gate: UnsafePointer<Float>, b: Int, n: Int, c: Int) {
    profiled(.residual, .forward) {
        parallelFor(b * n, grain: 64) { rows in
            for r in rows {
                let g = gate + (r / n) * c, x = inp + r * c, y = out + r * c
                var i = 0
                while i + 8 <= c { store8(y + i, load8(x + i) * load8(g + i)); i += 8 }
                while i < c { y[i] = x[i] * g[i]; i += 1 }
            }
        }
    }
}

/// Backward of channelGateForward, accumulating dinp += dout · gate and dgate[b,c] += Σ_rows dout · inp.
public func channelGateBackward(dinp: UnsafeMutablePointer<Float>?, dgate: UnsafeMutablePointer<Float>?,
                                _ dout: UnsafePointer<Float>, _ inp: UnsafePointer<Float>, _ gate: UnsafePointer<Float>,
                                b: Int, n: Int, c: Int) {
    profiled(.residual, .backward) {
        if let dgate {
            for bi in 0..<b { for r in 0..<n {
                let x = inp + (bi * n + r) * c, dy = dout + (bi * n + r) * c
                for i in 0..<c { dgate[bi * c + i] += dy[i] * x[i] }
            } }
        }
        guard let dinp else { return }
        parallelFor(b * n, grain: 64) { rows in
            for r in rows {
                let g = gate + (r / n) * c
                for i in 0..<c { dinp[r * c + i] += dout[r * c + i] * g[i] }
            }
        }
    }
}

/// Naive grouped convolution in Double, the oracle of the convolution kernels: out (B,OH,OW,OC) from
/// inp (B,H,W,C), weight (OC, C/groups, k, k) in PyTorch's layout, bias (OC) or nil; output o of group
/// g = o / (OC/groups) reads inputs g·(C/groups) ..< (g+1)·(C/groups).
public func referenceConv2d(_ inp: [Double], _ weight: [Double], _ bias: [Double]?, b: Int, h: Int, w: Int, c: Int,
                            outChannels oc: Int, groups: Int, kernel k: Int, stride s: Int, padding p: Int) -> [Double] {
    let oh = convOutputSize(h, kernel: k, stride: s, padding: p), ow = convOutputSize(w, kernel: k, stride: s, padding: p)
    let ipg = c / groups, opg = oc / groups
    var out = [Double](repeating: 0, count: b * oh * ow * oc)
    for bi in 0..<b { for oy in 0..<oh { for ox in 0..<ow { for o in 0..<oc {
        var acc = bias?[o] ?? 0
        let g = o / opg
        for i in 0..<ipg { for ky in 0..<k { for kx in 0..<k {
            let iy = oy * s + ky - p, ix = ox * s + kx - p
            guard iy >= 0, iy < h, ix >= 0, ix < w else { continue }
            acc += weight[((o * ipg + i) * k + ky) * k + kx] * inp[((bi * h + iy) * w + ix) * c + g * ipg + i]
        } } }
        out[((bi * oh + oy) * ow + ox) * oc + o] = acc
    } } } }
    return out
}

/// Rows per tile of `pointwiseMLPForward`: a tile's hidden activations (rows × hidden floats) stay near
/// 512 KiB, inside a core's L2 cache, between the two GEMMs. A multiple of 16, at least 32; it depends on
/// the widths only (never on the thread count), so neither do the bits of the result.
public func pointwiseMLPTileRows(hidden: Int) -> Int {
    max(32, min(512, (1 << 17) / max(hidden, 1)) / 16 * 16)
}

/// The pointwise half of a ConvMlp (two 1×1 convolutions on channels-last rows) in row tiles:
/// out (N,OUT) = [residual (N,OUT) +] act(inp (N,C) · w1ᵀ + b1) · w2ᵀ [+ b2], w1 (HIDDEN,C), w2 (OUT,HIDDEN).
/// Each tile runs fc1's GEMM, the bias and activation in place, and fc2's GEMM onto the residual and b2 while
/// its hidden activations are still in cache, so the (N,HIDDEN) map never makes a pass through memory.
/// With at least as many tiles as threads the tiles are shared out over the threads (one each at a time);
/// with fewer, the tiles run in turn with every thread on each GEMM (`sgemm` splits only products whose
/// blocks give the bits of one call), so the result has the same bits whatever the thread count.
/// With `preActivation` (N,HIDDEN), inp · w1ᵀ + b1 is kept there for a backward pass. out may alias
/// residual, not inp.
public func pointwiseMLPForward(_ out: UnsafeMutablePointer<Float>, adding residual: UnsafePointer<Float>?,
                                _ inp: UnsafePointer<Float>, fc1 w1: UnsafePointer<Float>, _ b1: UnsafePointer<Float>,
                                fc2 w2: UnsafePointer<Float>, _ b2: UnsafePointer<Float>?,
                                n: Int, c: Int, hidden: Int, outFeatures oc: Int, _ act: Activation,
                                preActivation: UnsafeMutablePointer<Float>? = nil) {
    let tile = pointwiseMLPTileRows(hidden: hidden), tiles = (n + tile - 1) / tile
    func run(_ range: Range<Int>) {
        let scratch = UnsafeMutablePointer<Float>.allocate(capacity: 2 * tile * hidden)
        defer { scratch.deallocate() }
        for t in range {
            let r0 = t * tile, rows = min(tile, n - r0)
            pointwiseMLPRows(out + r0 * oc, adding: residual.map { $0 + r0 * oc }, inp + r0 * c, fc1: w1, b1, fc2: w2, b2,
                             rows: rows, c: c, hidden: hidden, outFeatures: oc, act,
                             pre: preActivation.map { $0 + r0 * hidden } ?? scratch, activated: scratch + tile * hidden,
                             keep: preActivation != nil)
        }
    }
    if tiles >= KernelThreads.current { parallelFor(tiles, grain: 1, run) } else { run(0..<tiles) }
}

/// One block of rows of the pointwise MLP: pre = inp · w1ᵀ; pre += b1 and activated = act(pre) (in place
/// unless `keep`); out = [residual +] b2, then out += activated · w2ᵀ.
@inline(__always)
private func pointwiseMLPRows(_ out: UnsafeMutablePointer<Float>, adding residual: UnsafePointer<Float>?,
                              _ inp: UnsafePointer<Float>, fc1 w1: UnsafePointer<Float>, _ b1: UnsafePointer<Float>,
                              fc2 w2: UnsafePointer<Float>, _ b2: UnsafePointer<Float>?,
                              rows: Int, c: Int, hidden: Int, outFeatures oc: Int, _ act: Activation,
                              pre: UnsafeMutablePointer<Float>, activated: UnsafeMutablePointer<Float>, keep: Bool) {
    sgemm(transB: true, m: rows, n: hidden, k: c, a: inp, lda: c, b: w1, ldb: c, beta: 0, c: pre, ldc: hidden)
    let g = keep ? activated : pre
    biasActivationForward(g, pre, b1, n: rows, c: hidden, act)
    var beta: Float = 1
    if let residual {
        biasResidualForward(out, residual, b2, n: rows, c: oc)
    } else if let b2 {
        profiled(.bias, .forward) { for r in 0..<rows { (out + r * oc).update(from: b2, count: oc) } }
    } else {
        beta = 0
    }
    sgemm(transB: true, m: rows, n: oc, k: hidden, a: g, lda: hidden, b: w2, ldb: hidden, beta: beta, c: out, ldc: oc)
}
