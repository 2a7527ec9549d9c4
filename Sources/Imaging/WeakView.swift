/// The deterministic view the networks see at inference: torchvision's
/// `Compose([Resize(resize, BICUBIC), CenterCrop(crop), ToTensor(), Normalize(mean, std)])` on a PIL RGB image.
public struct WeakViewConfig: Sendable, Equatable {
    public var resize: Int
    public var crop: Int
    public var mean: [Float]
    public var std: [Float]

    public init(resize: Int, crop: Int, mean: [Float], std: [Float]) {
        precondition(resize > 0 && crop > 0 && mean.count == 3 && std.count == 3, "WeakViewConfig: bad sizes or statistics")
        self.resize = resize
        self.crop = crop
        self.mean = mean
        self.std = std
    }

    public static let clipMean: [Float] = [0.48145466, 0.4578275, 0.40821073]
    public static let clipStd: [Float] = [0.26862954, 0.26130258, 0.27577711]
    public static let imagenetMean: [Float] = [0.485, 0.456, 0.406]
    public static let imagenetStd: [Float] = [0.229, 0.224, 0.225]

    /// CLIP's preprocessing: shorter side 224, centre crop 224, CLIP statistics.
    public static let clip = WeakViewConfig(resize: 224, crop: 224, mean: clipMean, std: clipStd)
    /// DINO's evaluation preprocessing: shorter side 256, centre crop 224, ImageNet statistics.
    public static let dino = WeakViewConfig(resize: 256, crop: 224, mean: imagenetMean, std: imagenetStd)
}

/// torchvision's Resize(int) output size: the shorter side becomes `size`, the longer side
/// int(size * long / short) (truncated).
public func shorterSideSize(width: Int, height: Int, size: Int) -> (width: Int, height: Int) {
    let short = min(width, height), long = max(width, height)
    let newLong = Int(Double(size * long) / Double(short))
    return width <= height ? (size, newLong) : (newLong, size)
}

/// torchvision's CenterCrop offsets (Python's round-half-even of (size - crop) / 2); a crop larger than
/// the image pads it with black as torchvision does. Returns the crop's top-left in image coordinates.
public func centerCropOrigin(width: Int, height: Int, cropWidth: Int, cropHeight: Int) -> (x: Int, y: Int) {
    func offset(_ size: Int, _ crop: Int) -> Int {
        if crop > size { return -((crop - size) / 2) }
        return Int((Double(size - crop) / 2.0).rounded(.toNearestOrEven))
    }
    return (offset(width, cropWidth), offset(height, cropHeight))
}

/// torchvision's CenterCrop on a PIL image.
public func centerCrop(_ image: RGBImage, width: Int, height: Int) -> RGBImage {
    let o = centerCropOrigin(width: image.width, height: image.height, cropWidth: width, cropHeight: height)
    return cropImage(image, left: o.x, top: o.y, width: width, height: height)
}

/// The uint8 weak view: Resize(resize, bicubic) then CenterCrop(crop). Only the cropped window of the
/// resize is computed; it is bit-identical to Pillow's full resize followed by the crop.
public func weakViewCrop(_ image: RGBImage, resize: Int, crop: Int) -> RGBImage {
    let size = shorterSideSize(width: image.width, height: image.height, size: resize)
    let o = centerCropOrigin(width: size.width, height: size.height, cropWidth: crop, cropHeight: crop)
    if o.x >= 0 && o.y >= 0 {
        return resample(image, width: size.width, height: size.height, filter: .bicubic, crop: (o.x, o.y, crop, crop))
    }
    let resized = resample(image, width: size.width, height: size.height, filter: .bicubic)
    return cropImage(resized, left: o.x, top: o.y, width: crop, height: crop)
}

/// ToTensor + Normalize: out (3, H, W) = (pixel / 255 - mean) / std in Float32, as torch computes it.
public func normalizeCHW(_ image: RGBImage, mean: [Float], std: [Float], into out: UnsafeMutablePointer<Float>) {
    precondition(mean.count == 3 && std.count == 3, "normalizeCHW: mean and std need 3 values")
    let plane = image.width * image.height
    image.pixels.withUnsafeBufferPointer { src in
        for c in 0..<3 {
            let m = mean[c], s = std[c]
            let dst = out + c * plane
            for i in 0..<plane {
                dst[i] = (Float(src[i * 3 + c]) / 255 - m) / s
            }
        }
    }
}

public func normalizeCHW(_ image: RGBImage, mean: [Float], std: [Float]) -> [Float] {
    [Float](unsafeUninitializedCapacity: 3 * image.width * image.height) { buffer, count in
        normalizeCHW(image, mean: mean, std: std, into: buffer.baseAddress!)
        count = 3 * image.width * image.height
    }
}

/// The weak view as the networks' input: (3, crop, crop) Float32.
public func weakView(_ image: RGBImage, config: WeakViewConfig = .clip) -> [Float] {
    normalizeCHW(weakViewCrop(image, resize: config.resize, crop: config.crop), mean: config.mean, std: config.std)
}
