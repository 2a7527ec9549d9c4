import Daemon
import Foundation
import Queue

/// Exports of a succeeded job's labels in the layouts other tools read (docs/exports.md): a class-folder
/// tree (torchvision's ImageFolder), Label Studio tasks with predictions, a FiftyOne image
/// classification dataset. The pure parts (names, documents) are here; `ExportCommand` reads the
/// database and writes the files.
enum Export {
    /// One image of a job, as an export sees it.
    struct Image: Equatable, Sendable {
        /// `nola.images.path`: relative to the collection, the text form when the name is not valid UTF-8.
        var path: String
        /// The exact bytes of the relative path (`path_bytes`, or `path` in UTF-8).
        var rawPath: [UInt8]
        var format: String
        var sizeBytes: Int
        var label: String?
        var confidence: Double?
        var zeroShotLabel: String?
        var zeroShotConfidence: Double?
        var unreadable: String?

        var nameIsUTF8: Bool { Array(path.utf8) == rawPath }
    }

    enum Link: String, CaseIterable, Sendable {
        case symlink, hardlink, copy
    }

    /// The marker file at the top of a folder export: `--force` replaces only a folder that has one.
    static let markerName = ".nolad-export"

    // MARK: names

    /// A folder name for a class: '/' becomes '_', a leading '.' becomes '_' (no hidden folders, no
    /// "." or ".."), so every class is one visible folder. Names that clash after this (or differ only
    /// in case) get "~2", "~3" in class order.
    static func classFolders(_ classes: [String]) -> [String: String] {
        var folders: [String: String] = [:]
        var taken = Set<String>()
        for name in classes where folders[name] == nil {
            var safe = name.replacingOccurrences(of: "/", with: "_")
            if safe.hasPrefix(".") { safe = "_" + safe.dropFirst() }
            if safe.isEmpty { safe = "_" }
            var candidate = safe, n = 2
            while taken.contains(candidate.lowercased()) { candidate = "\(safe)~\(n)"; n += 1 }
            taken.insert(candidate.lowercased())
            folders[name] = candidate
        }
        return folders
    }

    /// Extensions torchvision's ImageFolder accepts for nolad's formats (it compares in lower case).
    static let extensions: [String: [String]] = ["jpeg": [".jpg", ".jpeg"], "png": [".png"]]

    /// The file name an image gets in a flat folder: its relative path with '/' written as "__"
    /// (so `a/b/c.jpg` is `a__b__c.jpg`), plus ".jpg" or ".png" when the name does not already end in an
    /// extension readers recognise for its format (nolad finds images by content, readers by name).
    static func flatName(_ image: Image) -> String {
        var name = image.path.replacingOccurrences(of: "/", with: "__")
        if name.hasPrefix(".") { name = "_" + name.dropFirst() }
        let accepted = extensions[image.format] ?? []
        if !accepted.contains(where: { name.lowercased().hasSuffix($0) }) { name += accepted.first ?? "" }
        return name
    }

    /// Makes names unique within one folder, case-insensitively (for case-insensitive file systems),
    /// in the order given: a repeated name gets "~2", "~3" before its extension.
    static func uniqueNames(_ names: [String]) -> [String] {
        var taken = Set<String>()
        return names.map { name in
            var candidate = name, n = 2
            let dot = name.lastIndex(of: ".").flatMap { $0 == name.startIndex ? nil : $0 }
            let stem = dot.map { String(name[..<$0]) } ?? name
            let ext = dot.map { String(name[$0...]) } ?? ""
            while taken.contains(candidate.lowercased()) { candidate = "\(stem)~\(n)\(ext)"; n += 1 }
            taken.insert(candidate.lowercased())
            return candidate
        }
    }

    /// The classes an export lists: the job's, then any other label its results hold, sorted.
    static func classes(job: [String], images: [Image]) -> [String] {
        let known = Set(job)
        let extra = Set(images.compactMap(\.label)).subtracting(known).sorted()
        return job + extra
    }

    /// Where each labelled image goes in a class-folder tree: "<class folder>/<flat name>", in path order.
    static func imageFolderPlan(classes: [String], images: [Image]) -> [(image: Image, destination: String)] {
        let folders = classFolders(classes)
        var byFolder: [String: [Image]] = [:]
        for image in images where image.label != nil { byFolder[folders[image.label!]!, default: []].append(image) }
        var plan: [(image: Image, destination: String)] = []
        for folder in byFolder.keys.sorted() {
            let members = byFolder[folder]!
            for (image, name) in zip(members, uniqueNames(members.map(flatName))) {
                plan.append((image, folder + "/" + name))
            }
        }
        return plan.sorted { $0.image.path < $1.image.path }
    }

    /// Where each labelled image goes in a FiftyOne dataset: "data/<flat name>" with '\' written as '_'
    /// (FiftyOne reads a backslash as a path separator, and the text form of a name that is not UTF-8
    /// has them), unique also without the extension (FiftyOne keys labels by the name without it).
    static func fiftyOnePlan(images: [Image]) -> [(image: Image, destination: String)] {
        let labelled = images.filter { $0.label != nil }
        var takenStems = Set<String>()
        var names: [String] = []
        for image in labelled {
            let name = flatName(image).replacingOccurrences(of: "\\", with: "_")
            let dot = name.lastIndex(of: ".")!
            let stem = String(name[..<dot]), ext = String(name[dot...])
            var candidate = stem, n = 2
            while takenStems.contains(candidate.lowercased()) { candidate = "\(stem)~\(n)"; n += 1 }
            takenStems.insert(candidate.lowercased())
            names.append(candidate + ext)
        }
        return zip(labelled, names).map { ($0, "data/" + $1) }
    }

    // MARK: documents

    /// The Label Studio labeling configuration whose names match the tasks: an Image named "image"
    /// reading `$image`, single-choice Choices named "label", one Choice per class.
    static func labelStudioConfig(classes: [String]) -> String {
        var xml = "<View>\n  <Image name=\"image\" value=\"$image\"/>\n  <Choices name=\"label\" toName=\"image\" choice=\"single\" showInLine=\"true\">\n"
        for c in classes { xml += "    <Choice value=\"\(xmlEscaped(c))\"/>\n" }
        xml += "  </Choices>\n</View>\n"
        return xml
    }

    static func xmlEscaped(_ s: String) -> String {
        var out = ""
        for c in s {
            switch c {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "\"": out += "&quot;"
            case "'": out += "&apos;"
            default: out.append(c)
            }
        }
        return out
    }

    /// Percent-encodes bytes for a URL: everything but unreserved characters and '/'.
    static func percentEncoded(_ bytes: [UInt8]) -> String {
        var out = ""
        for b in bytes {
            switch b {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"),
                 UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"),
                 UInt8(ascii: "~"), UInt8(ascii: "/"):
                out.append(Character(UnicodeScalar(b)))
            default:
                out += String(format: "%%%02X", b)
            }
        }
        return out
    }

    /// The value of a task's `data.image`: `urlPrefix` + the percent-encoded relative path when a prefix
    /// is given; otherwise the absolute file path (a `file://` URL when the name is not valid UTF-8, so
    /// that it still names the exact file).
    static func imageReference(collection: String, image: Image, urlPrefix: String?) -> String {
        if let urlPrefix { return urlPrefix + percentEncoded(image.rawPath) }
        if image.nameIsUTF8 { return collection + "/" + image.path }
        return "file://" + percentEncoded(Array(collection.utf8) + [UInt8(ascii: "/")] + image.rawPath)
    }

    /// Label Studio tasks (its "basic JSON format" with pre-annotations): one task per labelled image,
    /// `data.image` plus the path and the zero-shot opinion as extra data columns, and one prediction
    /// whose `score` is the label's confidence (Label Studio's Data Manager can sort by it) and whose
    /// one result has an id unique in the file.
    static func labelStudioTasks(jobID: Int64, collection: String, images: [Image], urlPrefix: String?) -> JSONValue {
        .array(images.filter { $0.label != nil }.enumerated().map { index, image in
            var data: [String: JSONValue] = [
                "image": .string(imageReference(collection: collection, image: image, urlPrefix: urlPrefix)),
                "path": .string(image.path),
            ]
            if let z = image.zeroShotLabel { data["zero_shot_label"] = .string(z) }
            if let z = image.zeroShotConfidence { data["zero_shot_confidence"] = .number(z) }
            var prediction: [String: JSONValue] = [
                "model_version": .string("nolad job \(jobID)"),
                "result": [[
                    "id": .string("nolad-\(index)"), "from_name": "label", "to_name": "image", "type": "choices",
                    "value": ["choices": [.string(image.label!)]],
                ]],
            ]
            if let c = image.confidence { prediction["score"] = .number(c) }
            return ["data": .object(data), "predictions": [.object(prediction)]]
        })
    }

    /// FiftyOne's FiftyOneImageClassificationDataset `labels.json`: the classes, and for each file of
    /// `data/` (by name without extension) its label as an index into them with its confidence.
    static func fiftyOneLabels(classes: [String], plan: [(image: Image, destination: String)]) -> JSONValue {
        let index = Dictionary(uniqueKeysWithValues: classes.enumerated().map { ($1, $0) })
        var labels: [String: JSONValue] = [:]
        for (image, destination) in plan {
            let name = String(destination.dropFirst("data/".count))
            let stem = String(name[..<name.lastIndex(of: ".")!])
            var target: [String: JSONValue] = ["label": .number(Double(index[image.label!]!))]
            if let c = image.confidence { target["confidence"] = .number(c) }
            labels[stem] = .object(target)
        }
        return ["classes": .array(classes.map { .string($0) }), "labels": .object(labels)]
    }
}

extension JSONValue {
    /// Indented JSON with sorted keys (exports people may read).
    var prettyJSONText: String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes, .prettyPrinted]
        return String(decoding: (try? encoder.encode(self)) ?? Data("null".utf8), as: UTF8.self) + "\n"
    }
}
