import Foundation

/// A model folder's `preprocessor_config.json`: the image processor transformers' `AutoImageProcessor`
/// builds (CLIPImageProcessor for CLIP, BitImageProcessor for DINOv2, ViTImageProcessor for DINO).
/// Field names follow the file's keys; absent keys take that processor class's defaults, as transformers
/// does. Steps nolad does not implement, unknown values and contradictions are refused at load.
public struct ImagePreprocessorConfig: Sendable, Equatable {
    /// `size`: {"shortest_edge": N} keeps the aspect ratio (the longer side int(N · long / short));
    /// {"height": H, "width": W} resizes to exactly H×W.
    public enum Size: Sendable, Equatable {
        case shortestEdge(Int)
        case exact(height: Int, width: Int)
    }
    /// `resample`, Pillow's enum: 0 NEAREST, 2 BILINEAR, 3 BICUBIC (1 LANCZOS, 4 BOX, 5 HAMMING refused).
    public enum Resample: Int, Sendable, Equatable {
        case nearest = 0
        case bilinear = 2
        case bicubic = 3
    }

    /// `image_processor_type` without a Fast/Pil suffix (legacy `feature_extractor_type` mapped), or the
    /// class transformers picks for the model type when the file names none.
    public var imageProcessorType: String
    public var doResize: Bool
    public var size: Size
    public var resample: Resample
    public var doCenterCrop: Bool
    public var cropSize: (height: Int, width: Int)
    public var doRescale: Bool
    public var rescaleFactor: Double
    public var doNormalize: Bool
    public var imageMean: [Float]
    public var imageStd: [Float]
    public var doConvertRGB: Bool

    public static func == (a: Self, b: Self) -> Bool {
        a.imageProcessorType == b.imageProcessorType && a.doResize == b.doResize && a.size == b.size && a.resample == b.resample
            && a.doCenterCrop == b.doCenterCrop && a.cropSize == b.cropSize && a.doRescale == b.doRescale
            && a.rescaleFactor == b.rescaleFactor && a.doNormalize == b.doNormalize && a.imageMean == b.imageMean
            && a.imageStd == b.imageStd && a.doConvertRGB == b.doConvertRGB
    }

    public static let fileName = "preprocessor_config.json"

    /// The processor classes understood, with transformers' class defaults. `intSizeIsSquare`: an int `size`
    /// means H×W (ViT) rather than the shorter side (CLIP, BiT), as `get_size_dict(default_to_square:)`.
    struct ClassDefaults {
        let size: Size, intSizeIsSquare: Bool, resample: Resample, doCenterCrop: Bool
        let mean: [Float], std: [Float], doConvertRGB: Bool
    }
    static let openAIMean: [Float] = [0.48145466, 0.4578275, 0.40821073]
    static let openAIStd: [Float] = [0.26862954, 0.26130258, 0.27577711]
    static let classes: [String: ClassDefaults] = [
        "CLIPImageProcessor": ClassDefaults(size: .shortestEdge(224), intSizeIsSquare: false, resample: .bicubic, doCenterCrop: true,
                                            mean: openAIMean, std: openAIStd, doConvertRGB: true),
        "BitImageProcessor": ClassDefaults(size: .shortestEdge(224), intSizeIsSquare: false, resample: .bicubic, doCenterCrop: true,
                                           mean: openAIMean, std: openAIStd, doConvertRGB: true),
        "ViTImageProcessor": ClassDefaults(size: .exact(height: 224, width: 224), intSizeIsSquare: true, resample: .bilinear,
                                           doCenterCrop: false, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5], doConvertRGB: false),
    ]
    /// transformers' processor class for a config.json `model_type` when the file names none.
    static let classOfModelType = ["clip": "CLIPImageProcessor", "dinov2": "BitImageProcessor", "vit": "ViTImageProcessor"]

    /// Reads `folder/preprocessor_config.json`; nil when the folder has none. `modelType` is config.json's
    /// `model_type` (clip, vit, dinov2), used when the file does not name its processor class.
    public static func read(folder: URL, modelType: String) throws -> ImagePreprocessorConfig? {
        let url = folder.appendingPathComponent(fileName)
        guard FileManager.default.fileExists(atPath: url.path) else { return nil }
        return try ImagePreprocessorConfig(object: try readJSONObject(url), file: url.path, modelType: modelType)
    }

    /// `object` is the file's JSON object; `file` names it in errors.
    public init(object o: [String: Any], file: String, modelType: String) throws {
        func bad(_ reason: String) -> CheckpointError { .badConfig(file: file, reason: reason) }
        func isNull(_ key: String) -> Bool { o[key] == nil || o[key] is NSNull }

        // The processor class: named in the file, or the one transformers picks for the model type.
        var type: String
        if let t = o["image_processor_type"], !(t is NSNull) {
            guard let s = t as? String else { throw bad("image_processor_type is not a string") }
            type = s
        } else if let t = o["feature_extractor_type"], !(t is NSNull) {
            guard let s = t as? String else { throw bad("feature_extractor_type is not a string") }
            type = s.hasSuffix("FeatureExtractor") ? String(s.dropLast("FeatureExtractor".count)) + "ImageProcessor" : s
        } else if let t = Self.classOfModelType[modelType] {
            type = t
        } else {
            throw bad("names no image_processor_type, and model_type \(modelType) has no default processor")
        }
        for suffix in ["Fast", "Pil"] where type.hasSuffix(suffix) { type = String(type.dropLast(suffix.count)) }
        guard let d = Self.classes[type] else {
            throw bad("image processor \(type) is not supported (\(Self.classes.keys.sorted().joined(separator: ", ")))")
        }
        imageProcessorType = type

        func bool(_ key: String, _ fallback: Bool) throws -> Bool {
            if isNull(key) { return fallback }
            guard let n = o[key] as? NSNumber, isJSONBoolean(n) else { throw bad("\(key) is not true or false") }
            return n.boolValue
        }
        func positiveInt(_ value: Any, _ what: String) throws -> Int {
            guard let n = value as? NSNumber, !isJSONBoolean(n), Double(n.intValue) == n.doubleValue, n.intValue > 0 else {
                throw bad("\(what) is not a positive integer")
            }
            return n.intValue
        }
        /// get_size_dict: an int (shorter side, or square where `square`), [H, W], or a dict of
        /// shortest_edge alone or height + width.
        func sizeValue(_ key: String, square: Bool) throws -> Size? {
            guard !isNull(key) else { return nil }
            let value = o[key]!
            if let list = value as? [Any] {
                guard list.count == 2 else { throw bad("\(key) \(value) is not [height, width]") }
                return .exact(height: try positiveInt(list[0], "\(key)[0]"), width: try positiveInt(list[1], "\(key)[1]"))
            }
            if let dict = value as? [String: Any] {
                let keys = Set(dict.filter { !($0.value is NSNull) }.keys)
                if keys == ["shortest_edge"] { return .shortestEdge(try positiveInt(dict["shortest_edge"]!, "\(key).shortest_edge")) }
                if keys == ["height", "width"] {
                    return .exact(height: try positiveInt(dict["height"]!, "\(key).height"), width: try positiveInt(dict["width"]!, "\(key).width"))
                }
                throw bad("\(key) has keys \(keys.sorted()); supported are {\"shortest_edge\"} or {\"height\", \"width\"}")
            }
            let n = try positiveInt(value, key)
            return square ? .exact(height: n, width: n) : .shortestEdge(n)
        }
        func triple(_ key: String, _ fallback: [Float]) throws -> [Float] {
            if isNull(key) { return fallback }
            if let n = o[key] as? NSNumber, !isJSONBoolean(n) { return [Float](repeating: n.floatValue, count: 3) }
            guard let list = o[key] as? [Any], list.count == 3,
                  let values = list.map({ ($0 as? NSNumber).flatMap { isJSONBoolean($0) ? nil : $0.floatValue } }) as? [Float],
                  values.allSatisfy(\.isFinite) else {
                throw bad("\(key) is not a number or a list of 3 numbers (one per RGB channel)")
            }
            return values
        }

        doResize = try bool("do_resize", true)
        size = try sizeValue("size", square: d.intSizeIsSquare) ?? d.size
        if isNull("resample") {
            resample = d.resample
        } else {
            let names = [1: "LANCZOS", 4: "BOX", 5: "HAMMING"]
            guard let n = o["resample"] as? NSNumber, !isJSONBoolean(n), Double(n.intValue) == n.doubleValue else {
                throw bad("resample \(o["resample"]!) is not one of Pillow's filter numbers")
            }
            guard let r = Resample(rawValue: n.intValue) else {
                throw bad("resample \(n.intValue)\(names[n.intValue].map { " (\($0))" } ?? "") is not supported; nolad resizes with 0 NEAREST, 2 BILINEAR or 3 BICUBIC")
            }
            resample = r
        }
        doCenterCrop = try bool("do_center_crop", d.doCenterCrop)
        switch try sizeValue("crop_size", square: true) {
        case nil: cropSize = (224, 224)
        case .exact(let h, let w): cropSize = (h, w)
        case .shortestEdge: throw bad("crop_size needs a height and a width, not a shortest_edge")
        }
        doRescale = try bool("do_rescale", true)
        if isNull("rescale_factor") {
            rescaleFactor = 1.0 / 255.0
        } else {
            guard let n = o["rescale_factor"] as? NSNumber, !isJSONBoolean(n), n.doubleValue > 0, n.doubleValue.isFinite else {
                throw bad("rescale_factor is not a positive number")
            }
            rescaleFactor = n.doubleValue
        }
        doNormalize = try bool("do_normalize", true)
        imageMean = try triple("image_mean", d.mean)
        imageStd = try triple("image_std", d.std)
        if doNormalize, imageStd.contains(where: { $0 == 0 }) { throw bad("image_std \(imageStd) has a zero: normalising would divide by it") }
        doConvertRGB = try bool("do_convert_rgb", d.doConvertRGB)

        // Steps that would change the tensor and that nolad does not do.
        for key in o.keys.sorted() where key.hasPrefix("do_") && !Self.implementedSteps.contains(key) {
            if try bool(key, false) { throw bad("\(key) is true; nolad does not implement that step (it does \(Self.implementedSteps.sorted().joined(separator: ", ")))") }
        }
        if !isNull("crop_pct") { throw bad("crop_pct is set; nolad does not implement resizing by a crop percentage") }
    }

    static let implementedSteps: Set<String> = ["do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"]

    /// The (height, width) every processed image has, or nil when it depends on the image (a shortest-edge
    /// resize without a crop, or neither resize nor crop).
    public var outputSize: (height: Int, width: Int)? {
        if doCenterCrop { return cropSize }
        if doResize, case .exact(let h, let w) = size { return (h, w) }
        return nil
    }
}

/// JSONSerialization gives true/false as NSNumber too; they are the ones of type "c" (char).
func isJSONBoolean(_ n: NSNumber) -> Bool { String(cString: n.objCType) == "c" }
