import Foundation

// The strong view's operations, each a deterministic function of its parameters, as torchvision's
// functional ops do them on PIL images (which call Pillow's C code; see libImaging/*.c for each).

/// torchvision's F.resized_crop on a PIL image: crop (top, left, height, width), then resize to
/// size × size with Pillow's filter (RandomResizedCrop uses bilinear).
public func resizedCrop(_ image: RGBImage, top: Int, left: Int, height: Int, width: Int, size: Int,
                        filter: ResampleFilter = .bilinear) -> RGBImage {
    resample(cropImage(image, left: left, top: top, width: width, height: height), width: size, height: size, filter: filter)
}

/// Pillow's ImagingBlend(in1, in2, alpha) with in1 = `degenerate` (same layout as the image's pixels):
/// in1 + alpha * (in2 - in1) in float, truncated; clipped to 0...255 when alpha extrapolates.
private func blend(_ image: RGBImage, degenerate: [UInt8], factor: Double) -> RGBImage {
    let alpha = Float(factor)  // Python float → C float
    let interpolate = alpha >= 0 && alpha <= 1
    var out = [UInt8](repeating: 0, count: image.pixels.count)
    image.pixels.withUnsafeBufferPointer { in2 in
        degenerate.withUnsafeBufferPointer { in1 in
            out.withUnsafeMutableBufferPointer { dst in
                for i in 0..<dst.count {
                    let a = Int32(in1[i]), b = Int32(in2[i])
                    let v = Float(a) + alpha * Float(b - a)
                    dst[i] = interpolate ? UInt8(v) : v <= 0 ? 0 : v >= 255 ? 255 : UInt8(v)
                }
            }
        }
    }
    return RGBImage(width: image.width, height: image.height, pixels: out)
}

/// Pillow's RGB → L: (r·19595 + g·38470 + b·7471 + 2^15) >> 16.
@inline(__always) func luma(_ r: UInt8, _ g: UInt8, _ b: UInt8) -> UInt8 {
    let sum: Int32 = Int32(r) * 19595 + Int32(g) * 38470 + Int32(b) * 7471 + 0x8000
    return UInt8(truncatingIfNeeded: sum >> 16)
}

/// Pillow's convert("L").convert("RGB"): each pixel's luma in all three channels.
private func grayscaleRGB(_ image: RGBImage) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: image.pixels.count)
    image.pixels.withUnsafeBufferPointer { px in
        out.withUnsafeMutableBufferPointer { dst in
            for i in 0..<(image.width * image.height) {
                let l = luma(px[i * 3], px[i * 3 + 1], px[i * 3 + 2])
                dst[i * 3] = l; dst[i * 3 + 1] = l; dst[i * 3 + 2] = l
            }
        }
    }
    return out
}

/// torchvision F.adjust_brightness (ImageEnhance.Brightness: blend with black).
public func adjustBrightness(_ image: RGBImage, factor: Double) -> RGBImage {
    blend(image, degenerate: [UInt8](repeating: 0, count: image.pixels.count), factor: factor)
}

/// torchvision F.adjust_contrast (ImageEnhance.Contrast: blend with the mean of L, rounded).
public func adjustContrast(_ image: RGBImage, factor: Double) -> RGBImage {
    var sum = 0
    image.pixels.withUnsafeBufferPointer { px in
        for i in 0..<(image.width * image.height) { sum += Int(luma(px[i * 3], px[i * 3 + 1], px[i * 3 + 2])) }
    }
    let mean = UInt8(Int(Double(sum) / Double(image.width * image.height) + 0.5))
    return blend(image, degenerate: [UInt8](repeating: mean, count: image.pixels.count), factor: factor)
}

/// torchvision F.adjust_saturation (ImageEnhance.Color: blend with the image's L replicated).
public func adjustSaturation(_ image: RGBImage, factor: Double) -> RGBImage {
    blend(image, degenerate: grayscaleRGB(image), factor: factor)
}

/// torchvision F.adjust_hue on a PIL image: Pillow's RGB → HSV (uint8 channels), H += uint8(int32(f·255))
/// with wrap-around, HSV → RGB. factor in [-0.5, 0.5].
public func adjustHue(_ image: RGBImage, factor: Double) -> RGBImage {
    precondition(factor >= -0.5 && factor <= 0.5, "adjustHue: factor \(factor) outside [-0.5, 0.5]")
    let shift = UInt8(truncatingIfNeeded: Int32(factor * 255))
    var out = image.pixels
    out.withUnsafeMutableBufferPointer { px in
        for i in 0..<(image.width * image.height) {
            var (h, s, v) = rgbToHSV(px[i * 3], px[i * 3 + 1], px[i * 3 + 2])
            h = h &+ shift
            let rgb = hsvToRGB(h, s, v)
            px[i * 3] = rgb.0; px[i * 3 + 1] = rgb.1; px[i * 3 + 2] = rgb.2
        }
    }
    return RGBImage(width: image.width, height: image.height, pixels: out)
}

@inline(__always) private func clipToByte(_ v: Int) -> UInt8 { v <= 0 ? 0 : v < 256 ? UInt8(v) : 255 }

/// Pillow's rgb2hsv_row (Convert.c), with its float/double mix.
@inline(__always) func rgbToHSV(_ r: UInt8, _ g: UInt8, _ b: UInt8) -> (UInt8, UInt8, UInt8) {
    let maxc = max(r, g, b), minc = min(r, g, b)
    if minc == maxc { return (0, 0, maxc) }
    let cr = Float(maxc - minc)
    let s: Float = cr / Float(maxc)
    let rc: Float = Float(maxc - r) / cr
    let gc: Float = Float(maxc - g) / cr
    let bc: Float = Float(maxc - b) / cr
    var h: Float
    if r == maxc {
        h = bc - gc
    } else if g == maxc {
        h = Float(2.0 + Double(rc) - Double(bc))
    } else {
        h = Float(4.0 + Double(gc) - Double(rc))
    }
    // fmod(h / 6 + 1, 1): the argument lies in [5/6, 11/6), where subtracting 1 is exact.
    let wrapped = Double(h) / 6.0 + 1.0
    h = Float(wrapped >= 1.0 ? wrapped - 1.0 : wrapped)
    return (clipToByte(Int(Double(h) * 255.0)), clipToByte(Int(Double(s) * 255.0)), maxc)
}

/// Pillow's hsv2rgb (Convert.c).
@inline(__always) func hsvToRGB(_ h: UInt8, _ s: UInt8, _ v: UInt8) -> (UInt8, UInt8, UInt8) {
    if s == 0 { return (v, v, v) }
    let i = Int(floor(Double(Float(h)) * 6.0 / 255.0))
    let f = Float(Double(Float(h)) * 6.0 / 255.0 - Double(Float(i)))
    let fs = Float(Double(Float(s)) / 255.0)
    let fv = Double(Float(v))
    let p = clipToByte(Int((fv * (1.0 - Double(fs))).rounded()))
    let q = clipToByte(Int((fv * (1.0 - Double(fs * f))).rounded()))
    let t = clipToByte(Int((fv * (1.0 - Double(fs) * (1.0 - Double(f)))).rounded()))
    switch i % 6 {
    case 0: return (v, t, p)
    case 1: return (q, v, p)
    case 2: return (p, v, t)
    case 3: return (p, q, v)
    case 4: return (t, p, v)
    default: return (v, p, q)
    }
}

/// torchvision's _get_perspective_coeffs: the 8 coefficients mapping output (end) points to input
/// (start) points, solved in double precision and rounded to Float32 as torchvision does.
public func perspectiveCoefficients(start: [(Int, Int)], end: [(Int, Int)]) -> [Float] {
    precondition(start.count == 4 && end.count == 4, "perspectiveCoefficients: four corners each")
    var a = [[Double]](repeating: [Double](repeating: 0, count: 9), count: 8)
    for i in 0..<4 {
        let (x, y) = (Double(end[i].0), Double(end[i].1))
        let (u, v) = (Double(start[i].0), Double(start[i].1))
        a[2 * i] = [x, y, 1, 0, 0, 0, -u * x, -u * y, u]
        a[2 * i + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y, v]
    }
    // Gaussian elimination with partial pivoting on the augmented 8 × 9 matrix.
    for col in 0..<8 {
        let pivot = (col..<8).max { abs(a[$0][col]) < abs(a[$1][col]) }!
        a.swapAt(col, pivot)
        precondition(a[col][col] != 0, "perspectiveCoefficients: degenerate corners")
        for row in 0..<8 where row != col {
            let f = a[row][col] / a[col][col]
            if f == 0 { continue }
            for k in col..<9 { a[row][k] -= f * a[col][k] }
        }
    }
    return (0..<8).map { Float(a[$0][8] / a[$0][$0]) }
}

/// Pillow's Image.transform(size, PERSPECTIVE, coeffs, BICUBIC, fillcolor=0) as torchvision's
/// F.perspective calls it on a PIL image: output pixel centre (x+0.5, y+0.5) maps to
/// ((a·x + b·y + c) / (g·x + h·y + 1), (d·x + e·y + f) / (g·x + h·y + 1)); outside the input stays black.
/// The three channels of a pixel are sampled together in SIMD lanes, each lane with the operations of
/// `perspectiveReference` in the same order, so the bytes are the same.
public func perspective(_ image: RGBImage, coefficients: [Float]) -> RGBImage {
    // One byte more than the pixels: a pixel is read as 4 bytes (R, G, B and the next one's R, unused).
    perspectiveMap(image, coefficients, source: image.pixels + [0], bicubicSampleRGB)
}

/// Each output pixel centre mapped through the coefficients (in Pillow's order of operations) and sampled
/// from `source` (the image's pixels, maybe padded) by `sample`.
@inline(__always)
private func perspectiveMap(_ image: RGBImage, _ coefficients: [Float], source: [UInt8],
                            _ sample: (UnsafePointer<UInt8>, Int, Int, Double, Double, UnsafeMutablePointer<UInt8>) -> Void) -> RGBImage {
    precondition(coefficients.count == 8, "perspective: 8 coefficients")
    let c = coefficients.map(Double.init)
    let w = image.width, h = image.height
    var out = [UInt8](repeating: 0, count: w * h * 3)
    source.withUnsafeBufferPointer { src in
        out.withUnsafeMutableBufferPointer { dst in
            for y in 0..<h {
                let yo = Double(y) + 0.5
                for x in 0..<w {
                    let xo = Double(x) + 0.5
                    let den = c[6] * xo + c[7] * yo + 1
                    let xin = (c[0] * xo + c[1] * yo + c[2]) / den
                    let yin = (c[3] * xo + c[4] * yo + c[5]) / den
                    sample(src.baseAddress!, w, h, xin, yin, dst.baseAddress! + (y * w + x) * 3)
                }
            }
        }
    }
    return RGBImage(width: w, height: h, pixels: out)
}

/// `bicubicSample` with R, G, B in three lanes of one vector.
@inline(__always)
private func bicubicSampleRGB(_ src: UnsafePointer<UInt8>, _ w: Int, _ h: Int, _ xinIn: Double, _ yinIn: Double,
                              _ out: UnsafeMutablePointer<UInt8>) {
    if xinIn < 0.0 || xinIn >= Double(w) || yinIn < 0.0 || yinIn >= Double(h) { return }
    let xin = xinIn - 0.5, yin = yinIn - 0.5
    var x = Int(floor(xin)), y = Int(floor(yin))
    let dx = xin - Double(x), dy = yin - Double(y)
    x -= 1
    y -= 1
    typealias V = SIMD4<Double>
    @inline(__always) func cubic(_ v1: V, _ v2: V, _ v3: V, _ v4: V, _ d: Double) -> V {
        let p1 = v2
        let p2 = -v1 + v3
        let p3 = 2 * (v1 - v2) + v3 - v4
        let p4 = -v1 + v2 - v3 + v4
        return p1 + d * (p2 + d * (p3 + d * p4))
    }
    @inline(__always) func clampX(_ v: Int) -> Int { v < 0 ? 0 : v < w ? v : w - 1 }
    let x0 = clampX(x) * 3, x1 = clampX(x + 1) * 3, x2 = clampX(x + 2) * 3, x3 = clampX(x + 3) * 3
    @inline(__always) func pixel(_ p: UnsafePointer<UInt8>) -> V {
        V(SIMD4<Int32>(truncatingIfNeeded: UnsafeRawPointer(p).loadUnaligned(as: SIMD4<UInt8>.self)))
    }
    @inline(__always) func row(_ r: Int) -> V {
        let line = src + r * w * 3
        return cubic(pixel(line + x0), pixel(line + x1), pixel(line + x2), pixel(line + x3), dx)
    }
    let v1 = row(y < 0 ? 0 : y < h ? y : h - 1)
    let v2 = y + 1 >= 0 && y + 1 < h ? row(y + 1) : v1
    let v3 = y + 2 >= 0 && y + 2 < h ? row(y + 2) : v2
    let v4 = y + 3 >= 0 && y + 3 < h ? row(y + 3) : v3
    let v = cubic(v1, v2, v3, v4, dy)
    for b in 0..<3 { out[b] = v[b] <= 0.0 ? 0 : v[b] >= 255.0 ? 255 : UInt8(v[b]) }
}

/// `perspective` one channel at a time, as Pillow's C code: the reference the fast one is tested against.
public func perspectiveReference(_ image: RGBImage, coefficients: [Float]) -> RGBImage {
    perspectiveMap(image, coefficients, source: image.pixels, bicubicSample)
}

/// Pillow's bicubic_filter32RGB (Geometry.c): a = -0.5 cubic on the 4×4 neighbourhood of the pixel
/// centre grid, x clamped at the edges; rows past the edge repeat the previous row's value.
@inline(__always)
private func bicubicSample(_ src: UnsafePointer<UInt8>, _ w: Int, _ h: Int, _ xinIn: Double, _ yinIn: Double,
                           _ out: UnsafeMutablePointer<UInt8>) {
    if xinIn < 0.0 || xinIn >= Double(w) || yinIn < 0.0 || yinIn >= Double(h) { return }
    let xin = xinIn - 0.5, yin = yinIn - 0.5
    var x = Int(floor(xin)), y = Int(floor(yin))
    let dx = xin - Double(x), dy = yin - Double(y)
    x -= 1
    y -= 1
    @inline(__always) func cubic(_ v1: Double, _ v2: Double, _ v3: Double, _ v4: Double, _ d: Double) -> Double {
        let p1 = v2
        let p2 = -v1 + v3
        let p3 = 2 * (v1 - v2) + v3 - v4
        let p4 = -v1 + v2 - v3 + v4
        return p1 + d * (p2 + d * (p3 + d * p4))
    }
    @inline(__always) func clampX(_ v: Int) -> Int { v < 0 ? 0 : v < w ? v : w - 1 }
    let x0 = clampX(x) * 3, x1 = clampX(x + 1) * 3, x2 = clampX(x + 2) * 3, x3 = clampX(x + 3) * 3
    for b in 0..<3 {
        func row(_ r: Int) -> Double {
            let line = src + r * w * 3 + b
            return cubic(Double(line[x0]), Double(line[x1]), Double(line[x2]), Double(line[x3]), dx)
        }
        let v1 = row(y < 0 ? 0 : y < h ? y : h - 1)
        let v2 = y + 1 >= 0 && y + 1 < h ? row(y + 1) : v1
        let v3 = y + 2 >= 0 && y + 2 < h ? row(y + 2) : v2
        let v4 = y + 3 >= 0 && y + 3 < h ? row(y + 3) : v3
        let v = cubic(v1, v2, v3, v4, dy)
        out[b] = v <= 0.0 ? 0 : v >= 255.0 ? 255 : UInt8(v)
    }
}

/// Pillow's _gaussian_blur_radius: the box radius whose `passes` box blurs approximate a Gaussian of
/// standard deviation `radius` (Gwosdek et al.), in Pillow's float/double mix.
func boxBlurRadius(sigma radius: Float, passes: Int) -> Float {
    let sigma2: Float = radius * radius / Float(passes)
    let L = Float((12.0 * Double(sigma2) + 1.0).squareRoot())
    let l = Float(floor((Double(L) - 1.0) / 2.0))
    var a: Float = (2 * l + 1) * (l * (l + 1) - 3 * sigma2)
    a /= 6 * (sigma2 - (l + 1) * (l + 1))
    return l + a
}

/// Pillow's ImagingLineBoxBlur32 on one line of `count` pixels (4 lanes, the 4th unused): `src` → `dst`
/// (distinct), values 0...255 in and out.
private func boxBlurLine(_ dst: UnsafeMutablePointer<SIMD4<UInt32>>, _ src: UnsafePointer<SIMD4<UInt32>>, count: Int,
                         radius: Int, ww: UInt32, fw: UInt32) {
    let lastx = count - 1
    let edgeA = min(radius + 1, count)
    let edgeB = max(count - radius - 1, 0)
    let wwv = SIMD4<UInt32>(repeating: ww), fwv = SIMD4<UInt32>(repeating: fw), half = SIMD4<UInt32>(repeating: 1 << 23)
    var acc = src[0] &* UInt32(radius + 1)
    var x = 0
    while x < edgeA - 1 { acc &+= src[x]; x += 1 }
    acc &+= src[lastx] &* UInt32(truncatingIfNeeded: radius - edgeA + 1)
    @inline(__always) func step(_ x: Int, _ subtract: Int, _ add: Int, _ left: Int, _ right: Int) {
        acc = acc &+ src[add] &- src[subtract]
        let bulk = acc &* wwv &+ (src[left] &+ src[right]) &* fwv
        dst[x] = ((bulk &+ half) &>> 24) & 0xFF
    }
    if edgeA <= edgeB {
        for x in 0..<edgeA { step(x, 0, x + radius, 0, x + radius + 1) }
        for x in edgeA..<edgeB { step(x, x - radius - 1, x + radius, x - radius - 1, x + radius + 1) }
        for x in edgeB..<count { step(x, x - radius - 1, lastx, x - radius - 1, lastx) }
    } else {
        for x in 0..<edgeB { step(x, 0, x + radius, 0, x + radius + 1) }
        for x in edgeB..<edgeA { step(x, 0, lastx, 0, lastx) }
        for x in edgeA..<count { step(x, x - radius - 1, lastx, x - radius - 1, lastx) }
    }
}

/// Pillow's `image.filter(ImageFilter.GaussianBlur(radius))`: three box blurs of a fractional radius,
/// horizontally then vertically, in 8-bit fixed point (BoxBlur.c).
public func gaussianBlur(_ image: RGBImage, radius: Double) -> RGBImage {
    if radius == 0 { return image }
    let passes = 3
    let boxRadius = boxBlurRadius(sigma: Float(radius), passes: passes)
    if boxRadius == 0 { return image }
    let r = Int(boxRadius)
    let ww = UInt32(Float(1 << 24) / (boxRadius * 2 + 1))
    let fw = (UInt32(1 << 24) &- UInt32(r * 2 + 1) &* ww) / 2
    let w = image.width, h = image.height
    var out = image.pixels
    let longest = max(w, h)
    let lineA = UnsafeMutablePointer<SIMD4<UInt32>>.allocate(capacity: longest)
    let lineB = UnsafeMutablePointer<SIMD4<UInt32>>.allocate(capacity: longest)
    defer { lineA.deallocate(); lineB.deallocate() }
    out.withUnsafeMutableBufferPointer { px in
        // Rows, then columns (Pillow transposes); each line gets all passes in turn.
        for (lines, length, lineStride, pixelStride) in [(h, w, w * 3, 3), (w, h, 3, w * 3)] {
            for line in 0..<lines {
                let base = px.baseAddress! + line * lineStride
                var a = lineA, b = lineB
                for i in 0..<length {
                    let p = base + i * pixelStride
                    a[i] = SIMD4(UInt32(p[0]), UInt32(p[1]), UInt32(p[2]), 0)
                }
                for _ in 0..<passes {
                    boxBlurLine(b, a, count: length, radius: r, ww: ww, fw: fw)
                    swap(&a, &b)
                }
                for i in 0..<length {
                    let p = base + i * pixelStride
                    p[0] = UInt8(truncatingIfNeeded: a[i][0]); p[1] = UInt8(truncatingIfNeeded: a[i][1]); p[2] = UInt8(truncatingIfNeeded: a[i][2])
                }
            }
        }
    }
    return RGBImage(width: w, height: h, pixels: out)
}
