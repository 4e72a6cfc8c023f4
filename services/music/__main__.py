from bgm.server import serve
from services.music.servicer import build


def main() -> None:
    serve("music", build)


if __name__ == "__main__":
    main()
