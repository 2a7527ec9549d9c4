// The model's standard view from preprocessor_config.json, against transformers' AutoImageProcessor
// (backend "pil") + the model on real JPEGs (reference/make_preprocessor_fixtures.py): processed pixels
// ≤ 1e-5 absolute where the fixture has them, embeddings ≤ 1e-4 × their max magnitude. Every comparison
// prints its error. And the refusals of configs nolad cannot follow, each with its sentence.
import Foundation
import Imaging
import Kernels
import Models
import XCTest
@testable import Method

final class PreprocessorParityTests: XCTestCase {
    struct Case: Decodable {
        let name: String, model: String, processor: String, file: String
        let pixel_shape: [Int]
        let embedding: [Float]
        let pixel_values: String?
    }
    struct Cases: Decodable { let cases: [Case] }

    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Fixtures/preprocessor")

    override func invokeTest() { withThreads(2) { super.invokeTest() } }

    /// A temporary folder with links to `model`'s files and `processor` (if any) as its preprocessor_config.json.
    func folder(model: String, processor: URL?) throws -> URL {
        let source = Self.repository.appendingPathComponent(model)
        let dir = URL(fileURLWithPath: NSTemporaryDirectory()).appendingPathComponent("nolad-preprocessor-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(at: dir) }
        for name in try FileManager.default.contentsOfDirectory(atPath: source.path) where name != ImagePreprocessorConfig.fileName {
            try FileManager.default.createSymbolicLink(at: dir.appendingPathComponent(name), withDestinationURL: source.appendingPathComponent(name))
        }
        if let processor {
            try FileManager.default.copyItem(at: processor, to: dir.appendingPathComponent(ImagePreprocessorConfig.fileName))
        }
        return dir
    }

    enum Loaded { case clip(CLIPModel), vit(ViTModel) }

    /// The model of `folder` and its standard view (fallback: nolad's CLIP rules for CLIP, DINO rules otherwise).
    func load(_ folder: URL) throws -> (Loaded, ImageView) {
        let type = try XCTUnwrap(try readConfig(folder: folder)["model_type"] as? String)
        if type == "clip" {
            let m = try CLIPModel(folder: folder)
            let s = m.config.visionConfig.imageSize
            return (.clip(m), try standardView(folder: folder, modelType: type, input: .square(s),
                                               fallback: WeakViewConfig(resize: s, crop: s, mean: WeakViewConfig.clipMean, std: WeakViewConfig.clipStd)))
        }
        let m = try ViTModel(folder: folder)
        let s = m.config.imageSize
        let input: InputSizeRule = m.kind == .dinov2 ? .multipleOf(m.config.patchSize) : .square(s)
        return (.vit(m), try standardView(folder: folder, modelType: type, input: input,
                                          fallback: WeakViewConfig(resize: Int((Double(s) * 256 / 224).rounded()), crop: s,
                                                                   mean: WeakViewConfig.imagenetMean, std: WeakViewConfig.imagenetStd)))
    }

    func embed(_ model: Loaded, _ view: ImageView, file: String) throws -> (pixels: [Float], width: Int, height: Int, embedding: [Float]) {
        let image = try decodeImage(at: Self.repository.appendingPathComponent(file), options: DecodeOptions())
        let (pixels, w, h) = view.apply(image)
        let embedding = pixels.withUnsafeBufferPointer { p -> [Float] in
            switch model {
            case .clip(let m): return m.getImageFeatures(pixels: p.baseAddress!, batch: 1)
            case .vit(let m): return m.clsFeatures(pixels: p.baseAddress!, batch: 1, height: h, width: w)
            }
        }
        return (pixels, w, h, embedding)
    }

    func testStandardView_ofFoldersWithPreprocessorConfigs_matchesAutoImageProcessorAndModelOnJPEGs() throws {
        let cases = try JSONDecoder().decode(Cases.self, from: Data(contentsOf: Self.fixtures.appendingPathComponent("cases.json"))).cases
        let pixelFile = try SafeTensorsFile(url: Self.fixtures.appendingPathComponent("pixel_values.safetensors"))
        XCTAssertEqual(cases.count, 28)
        XCTAssertEqual(Set(cases.map(\.name)).count, 7)
        var pixelCases = 0
        for c in cases {
            let dir = try folder(model: c.model, processor: Self.fixtures.appendingPathComponent(c.processor))
            let (model, view) = try load(dir)
            let got = try embed(model, view, file: c.file)
            let what = "\(c.name) \((c.file as NSString).lastPathComponent)"
            XCTAssertEqual([3, got.height, got.width], c.pixel_shape, what)
            if let key = c.pixel_values {
                assertClose(got.pixels, try pixelFile.floats(key), tolerance: 1e-5, "\(what) pixel values")
                pixelCases += 1
            }
            let scale = c.embedding.map(abs).max() ?? 1
            assertClose(got.embedding, c.embedding, tolerance: 1e-4 * scale, "\(what) embedding (scale \(scale))")
        }
        XCTAssertEqual(pixelCases, 10)
    }

    /// Without its preprocessor_config.json the DINOv2 folder is preprocessed from config.json's image_size 518
    /// (shorter side 592, crop 518): a different input size, so a different embedding from the processor's.
    func testDINOv2With518Config_withoutPreprocessorConfig_fallsBackToImageSizeAndDiffers() throws {
        let cases = try JSONDecoder().decode(Cases.self, from: Data(contentsOf: Self.fixtures.appendingPathComponent("cases.json"))).cases
        let c = try XCTUnwrap(cases.first { $0.name == "dinov2_hub" })
        let (model, view) = try load(try folder(model: c.model, processor: nil))
        XCTAssertEqual(view, ImageView(WeakViewConfig(resize: 592, crop: 518, mean: WeakViewConfig.imagenetMean, std: WeakViewConfig.imagenetStd)))
        let got = try embed(model, view, file: c.file)
        XCTAssertEqual([got.width, got.height], [518, 518])
        let scale = c.embedding.map(abs).max() ?? 1
        let error = zip(got.embedding, c.embedding).map { abs($0 - $1) }.max() ?? 0
        print("dinov2 518 without preprocessor_config.json: relative difference \(error / scale) from AutoImageProcessor's 256/224")
        XCTAssertGreaterThan(error / scale, 1e-2)
        // The fixture folder itself carries the hub layout: 256 → 224, bicubic, ImageNet statistics.
        let own = try XCTUnwrap(try ImagePreprocessorConfig.read(folder: Self.fixtures.appendingPathComponent("dinov2-518"), modelType: "dinov2"))
        XCTAssertEqual(own.rescaleFactor, 1.0 / 255.0, accuracy: 1e-15)
        XCTAssertEqual(ImageView(preprocessor: own), ImageView(resize: .shortestEdge(256), filter: .bicubic, crop: (224, 224), cropRule: .transformers,
                                                               rescaleFactor: own.rescaleFactor, mean: WeakViewConfig.imagenetMean, std: WeakViewConfig.imagenetStd))
    }

    /// Pillow's NEAREST resize (reference/make_preprocessor_fixtures.py: FNV-1a 64 of the RGB bytes) of synthetic
    /// images to 45 sizes, up and down, odd ratios, 1-pixel sides; and a window of it equals the crop of the whole.
    func testResizeNearest_overASweepOfSizes_isByteExactWithPillow() throws {
        struct Sweep: Decodable { let cases: [Entry] }
        struct Entry: Decodable { let width: Int, height: Int, out_width: Int, out_height: Int, fnv1a64: String }
        let sweep = try JSONDecoder().decode(Sweep.self, from: Data(contentsOf: Self.fixtures.appendingPathComponent("nearest_sweep.json")))
        XCTAssertEqual(sweep.cases.count, 45)
        func fnv(_ bytes: [UInt8]) -> String {
            var h: UInt64 = 0xCBF29CE484222325
            for b in bytes { h = (h ^ UInt64(b)) &* 0x100000001B3 }
            let s = String(h, radix: 16)
            return String(repeating: "0", count: 16 - s.count) + s
        }
        var mismatches = 0
        for e in sweep.cases {
            var pixels = [UInt8](repeating: 0, count: e.width * e.height * 3)
            for y in 0..<e.height { for x in 0..<e.width { for c in 0..<3 { pixels[(y * e.width + x) * 3 + c] = UInt8((7 * x + 13 * y + 29 * c + x * y) % 256) } } }
            let image = RGBImage(width: e.width, height: e.height, pixels: pixels)
            let out = resizeNearest(image, width: e.out_width, height: e.out_height)
            if fnv(out.pixels) != e.fnv1a64 { mismatches += 1; print("nearest \(e.width)×\(e.height) → \(e.out_width)×\(e.out_height) differs from Pillow") }
            if e.out_width > 2 && e.out_height > 2 {
                let window = resizeNearest(image, width: e.out_width, height: e.out_height, crop: (1, 1, e.out_width - 2, e.out_height - 2))
                XCTAssertEqual(window.pixels, cropImage(out, left: 1, top: 1, width: e.out_width - 2, height: e.out_height - 2).pixels)
            }
        }
        print("nearest resize: \(sweep.cases.count - mismatches) of \(sweep.cases.count) sizes byte-equal to Pillow")
        XCTAssertEqual(mismatches, 0)
    }

    /// transformers starts a centre crop at floor((side − crop) / 2), torchvision at round-half-even: on the 199×301
    /// JPEG (resized to 256×387, crop 224: 81.5) they are a pixel apart, and only the floor matches the processor.
    func testCentreCrop_ofProcessorViews_startsAtTheFloorAsTransformers() throws {
        let cases = try JSONDecoder().decode(Cases.self, from: Data(contentsOf: Self.fixtures.appendingPathComponent("cases.json"))).cases
        let c = try XCTUnwrap(cases.first { $0.name == "dinov2_hub" && $0.file.hasSuffix("rgb_422.jpg") })
        let (model, view) = try load(try folder(model: c.model, processor: Self.fixtures.appendingPathComponent(c.processor)))
        XCTAssertEqual(view.resizedSize(width: 199, height: 301).height, 387)
        var torchvision = view
        torchvision.cropRule = .torchvision
        let scale = c.embedding.map(abs).max() ?? 1
        let floor = try embed(model, view, file: c.file).embedding, rounded = try embed(model, torchvision, file: c.file).embedding
        let floorError = zip(floor, c.embedding).map { abs($0 - $1) }.max() ?? 0
        let roundedError = zip(rounded, c.embedding).map { abs($0 - $1) }.max() ?? 0
        print("rgb_422 crop at floor: relative error \(floorError / scale); at round-half-even: \(roundedError / scale)")
        XCTAssertLessThanOrEqual(floorError, 1e-4 * scale)
        XCTAssertGreaterThan(roundedError, 1e-3 * scale)
    }

    func parse(_ json: String, modelType: String = "clip") throws -> ImagePreprocessorConfig {
        let object = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])
        return try ImagePreprocessorConfig(object: object, file: "preprocessor_config.json", modelType: modelType)
    }

    func assertRefused(_ json: String, modelType: String = "clip", saying words: [String], file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try parse(json, modelType: modelType), json, file: file, line: line) { error in
            let text = "\(error)"
            print("refused \(json): \(text)")
            XCTAssertTrue(text.hasPrefix("bad model config preprocessor_config.json: "), text, file: file, line: line)
            for w in words { XCTAssertTrue(text.contains(w), "\(text) lacks \(w)", file: file, line: line) }
        }
    }

    func testPreprocessorConfig_absentKeys_takeTheProcessorClassDefaults() throws {
        let clip = try parse("{}")
        XCTAssertEqual(clip.imageProcessorType, "CLIPImageProcessor")
        XCTAssertEqual(ImageView(preprocessor: clip), ImageView(resize: .shortestEdge(224), filter: .bicubic, crop: (224, 224), cropRule: .transformers,
                                                                rescaleFactor: 1.0 / 255.0, mean: WeakViewConfig.clipMean, std: WeakViewConfig.clipStd))
        // ViT: an int size is height = width (a squashing resize), bilinear, no crop, mean/std 0.5.
        let vit = try parse(#"{"feature_extractor_type": "ViTFeatureExtractor", "size": 96}"#, modelType: "vit")
        XCTAssertEqual(ImageView(preprocessor: vit), ImageView(resize: .exact(width: 96, height: 96), filter: .bilinear, crop: nil, cropRule: .transformers,
                                                               rescaleFactor: 1.0 / 255.0, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]))
        // BiT (DINOv2) by model type; an int size is the shorter side; one number for mean and std; steps off.
        let bit = try parse(#"{"size": 100, "crop_size": [56, 70], "image_mean": 0.5, "image_std": 0.25, "do_rescale": false, "do_convert_rgb": false}"#, modelType: "dinov2")
        XCTAssertEqual(bit.imageProcessorType, "BitImageProcessor")
        XCTAssertEqual(ImageView(preprocessor: bit), ImageView(resize: .shortestEdge(100), filter: .bicubic, crop: (70, 56), cropRule: .transformers,
                                                               rescaleFactor: nil, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]))
        let off = try parse(#"{"do_resize": false, "do_center_crop": false, "do_normalize": false, "image_processor_type": "BitImageProcessorFast", "do_pad": false}"#)
        XCTAssertEqual(ImageView(preprocessor: off), ImageView(resize: nil, filter: .bicubic, crop: nil, cropRule: .transformers,
                                                               rescaleFactor: 1.0 / 255.0, mean: nil, std: nil))
    }

    func testPreprocessorConfig_unsupportedOrContradictoryValues_areRefusedWithASentence() {
        assertRefused(#"{"resample": 1}"#, saying: ["resample 1 (LANCZOS) is not supported", "NEAREST", "BILINEAR", "BICUBIC"])
        assertRefused(#"{"resample": 4}"#, saying: ["BOX"])
        assertRefused(#"{"resample": "bicubic"}"#, saying: ["resample"])
        assertRefused(#"{"size": {"shortest_edge": 224, "longest_edge": 448}}"#, saying: ["size has keys", "longest_edge"])
        assertRefused(#"{"size": {"shortest_edge": 224, "height": 224, "width": 224}}"#, saying: ["size has keys"])
        assertRefused(#"{"size": 0}"#, saying: ["size is not a positive integer"])
        assertRefused(#"{"crop_size": {"shortest_edge": 224}}"#, saying: ["crop_size needs a height and a width"])
        assertRefused(#"{"image_processor_type": "SiglipImageProcessor"}"#, saying: ["SiglipImageProcessor is not supported", "CLIPImageProcessor"])
        assertRefused(#"{}"#, modelType: "siglip", saying: ["model_type siglip has no default processor"])
        assertRefused(#"{"image_mean": [0.5, 0.5]}"#, saying: ["image_mean is not a number or a list of 3 numbers"])
        assertRefused(#"{"image_std": [0.5, 0, 0.5]}"#, saying: ["image_std", "zero"])
        assertRefused(#"{"do_resize": "yes"}"#, saying: ["do_resize is not true or false"])
        assertRefused(#"{"rescale_factor": -1}"#, saying: ["rescale_factor is not a positive number"])
        assertRefused(#"{"do_pad": true}"#, saying: ["do_pad is true", "does not implement"])
        assertRefused(#"{"do_flip_channel_order": true}"#, saying: ["do_flip_channel_order"])
        assertRefused(#"{"crop_pct": 0.875}"#, saying: ["crop_pct"])
    }

    /// A processor whose output cannot enter the model is refused when the folder is loaded, naming the file.
    func testStandardView_whenProcessorOutputDoesNotFitTheModel_refusesAtLoad() throws {
        func refused(_ model: String, _ json: String, saying words: [String]) throws {
            let file = URL(fileURLWithPath: NSTemporaryDirectory()).appendingPathComponent("nolad-processor-\(UUID().uuidString).json")
            try Data(json.utf8).write(to: file)
            defer { try? FileManager.default.removeItem(at: file) }
            let dir = try folder(model: model, processor: file)
            XCTAssertThrowsError(try load(dir)) { error in
                let text = "\(error)"
                print("refused \(json): \(text)")
                XCTAssertTrue(text.contains(dir.appendingPathComponent("preprocessor_config.json").path), text)
                for w in words { XCTAssertTrue(text.contains(w), "\(text) lacks \(w)") }
            }
        }
        try refused("Tests/ModelsTests/Fixtures/clip", #"{"crop_size": 40, "size": 48}"#, saying: ["its images are 40×40", "the model takes 32×32 images"])
        try refused("Tests/ModelsTests/Fixtures/clip", #"{"do_center_crop": false, "size": {"shortest_edge": 32}}"#, saying: ["no fixed size", "32×32"])
        try refused("Tests/ModelsTests/Fixtures/dino", #"{"size": 40}"#, saying: ["40×40", "32×32"])
        try refused("Tests/MethodTests/Fixtures/preprocessor/dinov2-518", #"{"crop_size": 230}"#, saying: ["230×230", "multiples of 14"])
        // DINOv2 takes images of any multiple of its patch, so a shorter-side resize without a crop loads.
        let dir = try folder(model: "Tests/MethodTests/Fixtures/preprocessor/dinov2-518", processor: nil)
        try Data(#"{"do_center_crop": false, "size": {"shortest_edge": 224}}"#.utf8).write(to: dir.appendingPathComponent("preprocessor_config.json"))
        let (_, view) = try load(dir)
        XCTAssertNil(view.fixedOutputSize)
        XCTAssertEqual(view.outputSize(width: 1000, height: 750).height, 224)
    }
}
