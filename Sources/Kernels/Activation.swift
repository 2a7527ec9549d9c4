// Elementwise kernels: exp and erf in SIMD, GELU (erf) and QuickGELU, residual add, per-channel scale.

/// e^x for 8 lanes (Cephes polynomial, range reduction by ln 2); relative error ≈ 1e-7 on [−87, 88].
@inline(__always)
public func exp8(_ x: SIMD8<Float>) -> SIMD8<Float> {
    var x = x.replacing(with: -87, where: x .< -87)
    x.replace(with: 88, where: x .> 88)
    let n = (x * 1.44269504088896341).rounded(.toNearestOrEven)
    let r = x - n * 0.693359375 + n * 2.12194440e-4
    var p = SIMD8<Float>(repeating: 1.9875691500e-4)
    p = p * r + 1.3981999507e-3
    p = p * r + 8.3334519073e-3
    p = p * r + 4.1665795894e-2
    p = p * r + 1.6666665459e-1
    p = p * r + 5.0000001201e-1
    let y = p * r * r + r + 1
    // y · 2ⁿ by adding n to the exponent bits (n + 1.5·2²³ holds n in its low mantissa bits).
    let magic = SIMD8<Float>(repeating: 12582912)
    let nBits = unsafeBitCast(n + magic, to: SIMD8<UInt32>.self) &- unsafeBitCast(magic, to: SIMD8<UInt32>.self)
    return unsafeBitCast(unsafeBitCast(y, to: SIMD8<UInt32>.self) &+ (nBits &<< 23), to: SIMD8<Float>.self)
}

/// erf(x) for 8 lanes (Abramowitz & Stegun 7.1.26, absolute error ≤ 1.5e-7). |x| is clamped at 5, where
/// the formula already rounds to ±1: the same bits for every x, without the denormal p·t·e^(−x²) that
/// |x| > 9.2 would make (each one a microcode assist of ~100 cycles on x86).
@inline(__always)
public func erf8(_ x: SIMD8<Float>) -> SIMD8<Float> {
    var a = x.replacing(with: -x, where: x .< 0)
    a.replace(with: 5, where: a .> 5)
    let t = 1 / (1 + 0.3275911 * a)
    var p = SIMD8<Float>(repeating: 1.061405429)
    p = p * t - 1.453152027
    p = p * t + 1.421413741
    p = p * t - 0.284496736
    p = p * t + 0.254829592
    let y = 1 - p * t * exp8(-(a * a))
    return y.replacing(with: -y, where: x .< 0)
}

public enum Activation: String, Sendable {
    case gelu           // x · Φ(x), exact (erf) form: Hugging Face "gelu"
    case quickGelu      // x · σ(1.702 x): Hugging Face "quick_gelu"

    /// Parses a Hugging Face `hidden_act` value.
    public init?(huggingFace name: String) {
        switch name {
        case "gelu": self = .gelu
        case "quick_gelu": self = .quickGelu
        default: return nil
        }
    }
}

@inline(__always) func gelu8(_ x: SIMD8<Float>) -> SIMD8<Float> {
    0.5 * x * (1 + erf8(x * 0.70710678118654752))
}
@inline(__always) func geluGrad8(_ x: SIMD8<Float>) -> SIMD8<Float> {
    0.5 * (1 + erf8(x * 0.70710678118654752)) + x * exp8(-0.5 * x * x) * 0.39894228040143268
}
@inline(__always) func sigmoid8(_ x: SIMD8<Float>) -> SIMD8<Float> { 1 / (1 + exp8(-x)) }
@inline(__always) func quickGelu8(_ x: SIMD8<Float>) -> SIMD8<Float> { x * sigmoid8(1.702 * x) }
@inline(__always) func quickGeluGrad8(_ x: SIMD8<Float>) -> SIMD8<Float> {
    let s = sigmoid8(1.702 * x)
    return s + 1.702 * x * s * (1 - s)
}

/// Applies `f` to 8 lanes at a time over `count` elements, the tail padded with zeros, in parallel.
@inline(__always)
func map8(_ count: Int, _ f: (Int, Int) -> Void) {
    parallelFor((count + 7) / 8, grain: 2048) { blocks in f(blocks.lowerBound * 8, min(blocks.upperBound * 8, count)) }
}

/// out = act(inp); out, inp are (count). out may alias inp.
public func activationForward(_ out: UnsafeMutablePointer<Float>, _ inp: UnsafePointer<Float>,
                              count: Int, _ act: Activation) {
    profiled(.activation, .forward) {
        map8(count) { lo, hi in
            var i = lo
            while i + 8 <= hi {
                let x = load8(inp + i)
                store8(out + i, act == .gelu ? gelu8(x) : quickGelu8(x))
                i += 8
            }
            while i < hi {
                var x = SIMD8<Float>(repeating: 0); x[0] = inp[i]
                out[i] = (act == .gelu ? gelu8(x) : quickGelu8(x))[0]
                i += 1
            }
        }
    }
}

/// pre (N,C) += bias (C), then out (N,C) = act(pre): the epilogue of an MLP's first linear, one pass over
/// memory instead of three. out may alias pre (inference, where the pre-activation is not kept).
public func biasActivationForward(_ out: UnsafeMutablePointer<Float>, _ pre: UnsafeMutablePointer<Float>,
                                  _ bias: UnsafePointer<Float>, n: Int, c: Int, _ act: Activation) {
    profiled(.activation, .forward) {
        parallelFor(n, grain: 8) { rows in
            for r in rows {
                let p = pre + r * c, o = out + r * c
                var i = 0
                while i + 8 <= c {
                    let x = load8(p + i) + load8(bias + i)
                    store8(p + i, x)
                    store8(o + i, act == .gelu ? gelu8(x) : quickGelu8(x))
                    i += 8
                }
                while i < c {
                    var x = SIMD8<Float>(repeating: 0); x[0] = p[i] + bias[i]
                    p[i] = x[0]
                    o[i] = (act == .gelu ? gelu8(x) : quickGelu8(x))[0]
                    i += 1
                }
            }
        }
    }
}

/// Backward of `out = act(inp)`: dinp += act′(inp) · dout (or = with `accumulate` false: dinp is written,
/// not read). All are (count).
public func activationBackward(dinp: UnsafeMutablePointer<Float>, _ dout: UnsafePointer<Float>,
                               _ inp: UnsafePointer<Float>, count: Int, _ act: Activation, accumulate: Bool = true) {
    profiled(.activation, .backward) {
        map8(count) { lo, hi in
            var i = lo
            while i + 8 <= hi {
                let x = load8(inp + i)
                let g = load8(dout + i) * (act == .gelu ? geluGrad8(x) : quickGeluGrad8(x))
                store8(dinp + i, accumulate ? load8(dinp + i) + g : g)
                i += 8
            }
            while i < hi {
                var x = SIMD8<Float>(repeating: 0); x[0] = inp[i]
                let g = dout[i] * (act == .gelu ? geluGrad8(x) : quickGeluGrad8(x))[0]
                dinp[i] = accumulate ? dinp[i] + g : g
                i += 1
            }
        }
    }
}

/// out = a + b, all (count). out may alias a or b. (Its backward passes dout to both.)
public func residualForward(_ out: UnsafeMutablePointer<Float>, _ a: UnsafePointer<Float>,
                            _ b: UnsafePointer<Float>, count: Int) {
    profiled(.residual) {
        map8(count) { lo, hi in
            var i = lo
            while i + 8 <= hi { store8(out + i, load8(a + i) + load8(b + i)); i += 8 }
            while i < hi { out[i] = a[i] + b[i]; i += 1 }
        }
    }
}

/// out = inp · scale per channel (layer scale); out, inp are (N,C), scale is (C). out may alias inp.
public func channelScaleForward(_ out: UnsafeMutablePointer<Float>, _ inp: UnsafePointer<Float>,
                                _ scale: UnsafePointer<Float>, n: Int, c: Int) {
    profiled(.residual, .forward) {
        parallelFor(n, grain: 64) { rows in
            for r in rows {
                let o = out + r * c, x = inp + r * c
                var i = 0
                while i + 8 <= c { store8(o + i, load8(x + i) * load8(scale + i)); i += 8 }
                while i < c { o[i] = x[i] * scale[i]; i += 1 }
            }
        }
    }
}

/// out = residual + inp · scale per channel (layer scale and residual add in one pass); out, residual, inp
/// are (N,C), scale is (C). out may alias residual. Backward: dresidual = dout, dinp = dout · scale
/// (channelScaleBackward).
public func scaledResidualForward(_ out: UnsafeMutablePointer<Float>, _ residual: UnsafePointer<Float>,
                                  _ inp: UnsafePointer<Float>, _ scale: UnsafePointer<Float>, n: Int, c: Int) {
    profiled(.residual, .forward) {
        parallelFor(n, grain: 64) { rows in
            for r in rows {
                let o = out + r * c, x = residual + r * c, y = inp + r * c
                var i = 0
                while i + 8 <= c { store8(o + i, load8(x + i) + load8(y + i) * load8(scale + i)); i += 8 }
                while i < c { o[i] = x[i] + y[i] * scale[i]; i += 1 }
            }
        }
    }
}

/// Backward of channelScaleForward: dinp += dout · scale.
public func channelScaleBackward(dinp: UnsafeMutablePointer<Float>, _ dout: UnsafePointer<Float>,
                                 _ scale: UnsafePointer<Float>, n: Int, c: Int) {
    profiled(.residual, .backward) {
        parallelFor(n, grain: 64) { rows in
            for r in rows {
                let d = dinp + r * c, g = dout + r * c
                var i = 0
                while i + 8 <= c { store8(d + i, load8(d + i) + load8(g + i) * load8(scale + i)); i += 8 }
                while i < c { d[i] += g[i] * scale[i]; i += 1 }
            }
        }
    }
}
