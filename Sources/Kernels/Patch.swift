/// im2col for a patch embedding (a Conv2d with kernel = stride = p, no padding):
/// cols (B·gh·gw, C·p·p) from pixels (B,C,H,W), gh = H/p, gw = W/p, each row ordered (c, ky, kx)
/// like a flattened Conv2d weight (D,C,p,p), so the embedding is linearForward(cols, weight, bias).
public func im2colPatches(_ cols: UnsafeMutablePointer<Float>, _ pixels: UnsafePointer<Float>,
                          b: Int, c: Int, h: Int, w: Int, patch p: Int) {
    profiled(.patches, .forward) {
        let gh = h / p, gw = w / p
        parallelFor(b * gh, grain: 1) { rows in
            for row in rows {
                let bi = row / gh, gy = row % gh
                for gx in 0..<gw {
                    var dst = cols + ((bi * gh + gy) * gw + gx) * c * p * p
                    for ch in 0..<c {
                        for ky in 0..<p {
                            let src = pixels + ((bi * c + ch) * h + gy * p + ky) * w + gx * p
                            dst.update(from: src, count: p)
                            dst += p
                        }
                    }
                }
            }
        }
    }
}

/// Bicubic resize of a (C, inH, inW) grid to (C, outH, outW) exactly as PyTorch's
/// `interpolate(mode="bicubic", align_corners=False)` given an output size (A = −0.75, borders clamped).
public func bicubicResize(_ out: UnsafeMutablePointer<Float>, _ inp: UnsafePointer<Float>,
                          c: Int, inH: Int, inW: Int, outH: Int, outW: Int) {
    profiled(.copy, .forward) {
        func taps(_ dst: Int, inSize: Int, outSize: Int) -> ([Int], [Float]) {
            let scale = Float(inSize) / Float(outSize)
            let src = scale * (Float(dst) + 0.5) - 0.5
            let i0 = Int(src.rounded(.down))
            let t = src - Float(i0)
            let a: Float = -0.75
            func near(_ x: Float) -> Float { ((a + 2) * x - (a + 3)) * x * x + 1 }
            func far(_ x: Float) -> Float { ((a * x - 5 * a) * x + 8 * a) * x - 4 * a }
            let wts: [Float] = [far(t + 1), near(t), near(1 - t), far(2 - t)]
            let idx = (-1...2).map { min(max(i0 + $0, 0), inSize - 1) }
            return (idx, wts)
        }
        let ys = (0..<outH).map { taps($0, inSize: inH, outSize: outH) }
        let xs = (0..<outW).map { taps($0, inSize: inW, outSize: outW) }
        for ch in 0..<c {
            let plane = inp + ch * inH * inW
            for oy in 0..<outH {
                let (yi, yw) = ys[oy]
                for ox in 0..<outW {
                    let (xi, xw) = xs[ox]
                    var acc: Float = 0
                    for u in 0..<4 {
                        var rowAcc: Float = 0
                        for v in 0..<4 { rowAcc += plane[yi[u] * inW + xi[v]] * xw[v] }
                        acc += rowAcc * yw[u]
                    }
                    out[(ch * outH + oy) * outW + ox] = acc
                }
            }
        }
    }
}
